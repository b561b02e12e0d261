//! Section 7: fairness behind one address. 200 WebSocket users share one
//! address, each echoing in turn; one abusive user on the same address
//! floods. Three runs per round, in rotating order, each on a lab of its
//! own: a ticket per user without the abuser (the baseline), a ticket per
//! user with the abuser (per-user budgets), and no tickets with the abuser
//! (per-address limits only). The scenario is the one the namespace test
//! runs (`wsguard_tests::fairness`).

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use wsguard_tests::fairness::{self, Fairness, FairnessReport, Identity};

use crate::{report::table::Table, stats::Spread};

pub const USERS: usize = 200;
const OVER_BUDGET_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Setup {
    /// A ticket per user, no abuser.
    Baseline,
    /// A ticket per user, with the abuser.
    PerUser,
    /// No tickets, with the abuser.
    PerAddress,
}

impl Setup {
    const ALL: [Setup; 3] = [Setup::Baseline, Setup::PerUser, Setup::PerAddress];

    fn name(self) -> &'static str {
        match self {
            Setup::Baseline => "a ticket per user, no abuser",
            Setup::PerUser => "a ticket per user, abuser",
            Setup::PerAddress => "no tickets (per-address limits), abuser",
        }
    }

    fn scenario(self, phase: Duration) -> Fairness {
        let (identity, abuser) = match self {
            Setup::Baseline => (Identity::Tickets, false),
            Setup::PerUser => (Identity::Tickets, true),
            Setup::PerAddress => (Identity::AddressOnly, true),
        };
        Fairness {
            users: USERS,
            identity,
            abuser,
            phase,
            over_budget_timeout: OVER_BUDGET_TIMEOUT,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FairnessRun {
    pub setup: Setup,
    pub round: usize,
    pub echoes: usize,
    pub failures: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub slow: usize,
    pub others_dropped: Option<u64>,
    pub abuser_dropped: Option<u64>,
    pub address_dropped: u64,
    pub cut_after_s: Option<f64>,
    pub abuser_kib_per_second: f64,
}

impl FairnessRun {
    fn of(setup: Setup, round: usize, r: &FairnessReport) -> FairnessRun {
        FairnessRun {
            setup,
            round,
            echoes: r.echoes,
            failures: r.failures,
            p50_ms: r.p50.as_secs_f64() * 1e3,
            p99_ms: r.p99.as_secs_f64() * 1e3,
            max_ms: r.max.as_secs_f64() * 1e3,
            slow: r.slow,
            others_dropped: r.others_dropped,
            abuser_dropped: r.abuser_dropped,
            address_dropped: r.address_dropped,
            cut_after_s: r.cut_after.map(|d| d.as_secs_f64()),
            abuser_kib_per_second: r.abuser_bytes_per_second / 1024.0,
        }
    }
}

pub async fn run(rounds: usize, phase: Duration) -> Result<Vec<FairnessRun>> {
    let mut runs = Vec::new();
    for round in 0..rounds {
        for i in 0..Setup::ALL.len() {
            let setup = Setup::ALL[(i + round) % Setup::ALL.len()];
            eprintln!("bench: 7. fairness, round {}: {}", round + 1, setup.name());
            let report = fairness::run(setup.scenario(phase)).await?;
            runs.push(FairnessRun::of(setup, round, &report));
        }
    }
    Ok(runs)
}

pub fn markdown(runs: &[FairnessRun]) -> String {
    let of = |setup: Setup| runs.iter().filter(move |r| r.setup == setup);
    let spread = |setup: Setup, f: &dyn Fn(&FairnessRun) -> f64| {
        Spread::of(&of(setup).map(f).collect::<Vec<_>>())
    };
    // p99 as a ratio to the baseline of the same round.
    let p99_ratio = |setup: Setup| {
        let v: Vec<f64> = of(setup)
            .filter_map(|r| {
                let base = of(Setup::Baseline).find(|b| b.round == r.round)?;
                Some(r.p99_ms / base.p99_ms)
            })
            .collect();
        Spread::of(&v)
    };
    let sum = |setup: Setup, f: &dyn Fn(&FairnessRun) -> Option<u64>| -> String {
        let values: Vec<u64> = of(setup).filter_map(f).collect();
        if values.is_empty() {
            "–".into()
        } else {
            values.iter().sum::<u64>().to_string()
        }
    };
    let mut table = Table::new([
        "setup",
        "echoes (failed)",
        "p50 ms",
        "p99 ms",
        "p99 / baseline",
        "max ms",
        "echoes ≥ 100 ms",
        "other users' packets dropped",
        "address byte-rate drops",
        "abuser served KiB/s",
        "abuser cut after s",
    ]);
    for setup in Setup::ALL {
        let cut: Vec<f64> = of(setup).filter_map(|r| r.cut_after_s).collect();
        let runs_of = of(setup).count();
        table.row([
            setup.name().to_string(),
            format!(
                "{} ({})",
                of(setup).map(|r| r.echoes).sum::<usize>(),
                of(setup).map(|r| r.failures).sum::<usize>()
            ),
            spread(setup, &|r| r.p50_ms).show(2),
            spread(setup, &|r| r.p99_ms).show(2),
            if setup == Setup::Baseline {
                "1".into()
            } else {
                p99_ratio(setup).show(2)
            },
            spread(setup, &|r| r.max_ms).show(1),
            of(setup).map(|r| r.slow).sum::<usize>().to_string(),
            sum(setup, &|r| r.others_dropped),
            of(setup)
                .map(|r| r.address_dropped)
                .sum::<u64>()
                .to_string(),
            if setup == Setup::Baseline {
                "–".into()
            } else {
                spread(setup, &|r| r.abuser_kib_per_second).show(0)
            },
            match (setup, cut.len()) {
                (Setup::Baseline, _) => "–".into(),
                (_, 0) => "never".into(),
                (_, n) if n < runs_of => {
                    format!("{} (in {n} of {runs_of} runs)", Spread::of(&cut).show(1))
                }
                _ => Spread::of(&cut).show(1),
            },
        ]);
    }
    format!(
        "## 7. Fairness behind one address\n\n\
         {USERS} WebSocket users share one client address, each echoing a short message in turn \
         (all users one round trip after another, a round at most every 10 ms, for the whole phase); one abusive user on the \
         same address sends 8 KiB messages as fast as its {} connections take them. Per-user budget \
         64 KiB/s (burst 128 KiB), `over_budget_timeout` {} s, `ban.users = true`; the address's \
         own byte budget 1 MiB/s (burst 2 MiB), which the users' echoes fit in. Every run on a lab \
         of its own, the three setups in rotating order; medians over the rounds with min–max. \
         p99 / baseline is per round; an echo of 100 ms or more had a packet dropped and resent by TCP. With a ticket per user the abuser's bytes are charged to its \
         own budget: it is held back (its TCP resends what was dropped), then cut and banned, and \
         the other users' packets are never dropped. With per-address limits the abuser spends the \
         address's budget, and every user on the address pays for it.\n\n{table}\n",
        fairness::ABUSER_CONNECTIONS,
        OVER_BUDGET_TIMEOUT.as_secs()
    )
}
