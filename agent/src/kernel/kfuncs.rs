//! Kfunc calls in the kernel object. aya 0.14 does not resolve them: the
//! object holds each one as a call to an undefined symbol, which this module
//! turns into a kfunc call (`src_reg = BPF_PSEUDO_KFUNC_CALL`, `imm` = the
//! function's BTF id in the running kernel) before aya sees the object.
//! A kfunc this kernel lacks becomes `r0 = -EOPNOTSUPP`, so the object still
//! loads and the feature needing it reports itself unsupported.

use anyhow::{Context, Result};
use aya_obj::btf::{Btf, BtfKind};
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

/// The kfuncs the programs call.
pub const ASSIGN_TCP_REQSK: &str = "bpf_sk_assign_tcp_reqsk";
const KFUNCS: [&str; 1] = [ASSIGN_TCP_REQSK];

const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
/// `BPF_ALU64 | BPF_MOV | BPF_K`.
const MOV64_IMM: u8 = 0xb7;
const EOPNOTSUPP: i32 = 95;

/// The object with its kfunc calls resolved.
pub struct Resolved {
    pub object: Vec<u8>,
    /// Kfuncs this kernel does not have.
    pub missing: Vec<&'static str>,
}

impl Resolved {
    pub fn has(&self, kfunc: &str) -> bool {
        !self.missing.contains(&kfunc)
    }
}

pub fn resolve(object: &[u8]) -> Result<Resolved> {
    let btf = Btf::from_sys_fs().ok();
    let calls = kfunc_calls(object)?;
    let mut patched = object.to_vec();
    let mut missing = Vec::new();
    for (name, at) in calls {
        let id = btf
            .as_ref()
            .and_then(|btf| btf.id_by_type_name_kind(name, BtfKind::Func).ok());
        let insn = &mut patched[at..at + 8];
        match id {
            Some(id) => {
                insn[1] = BPF_PSEUDO_KFUNC_CALL << 4;
                insn[2..4].copy_from_slice(&0u16.to_le_bytes());
                insn[4..8].copy_from_slice(&(id as i32).to_le_bytes());
            }
            None => {
                insn[0] = MOV64_IMM;
                insn[1] = 0;
                insn[2..4].copy_from_slice(&0u16.to_le_bytes());
                insn[4..8].copy_from_slice(&(-EOPNOTSUPP).to_le_bytes());
                if !missing.contains(&name) {
                    missing.push(name);
                }
            }
        }
    }
    Ok(Resolved {
        object: patched,
        missing,
    })
}

/// (kfunc, file offset of the call instruction) for every call to a kfunc.
fn kfunc_calls(object: &[u8]) -> Result<Vec<(&'static str, usize)>> {
    let file = object::File::parse(object).context("the kernel object is not valid ELF")?;
    let mut calls = Vec::new();
    for section in file.sections() {
        let Some((start, _)) = section.file_range() else {
            continue;
        };
        for (offset, relocation) in section.relocations() {
            let RelocationTarget::Symbol(index) = relocation.target() else {
                continue;
            };
            let symbol = file.symbol_by_index(index)?;
            if !symbol.is_undefined() {
                continue;
            }
            if let Some(name) = KFUNCS.iter().find(|k| symbol.name() == Ok(k)) {
                calls.push((*name, (start + offset) as usize));
            }
        }
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kfunc_call_in_the_object_is_found() {
        let calls = kfunc_calls(super::super::EBPF_OBJECT).unwrap();
        assert!(
            calls.iter().any(|(name, _)| *name == ASSIGN_TCP_REQSK),
            "{calls:?}"
        );
        for (_, at) in calls {
            // An unresolved call: BPF_JMP | BPF_CALL, src_reg BPF_PSEUDO_CALL.
            assert_eq!(super::super::EBPF_OBJECT[at], 0x85);
            assert_eq!(super::super::EBPF_OBJECT[at + 1] >> 4, 1);
        }
    }
}
