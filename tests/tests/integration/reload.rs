//! SIGHUP re-reads the config and rewrites the maps in place; a config that
//! fails validation is refused and the running one keeps enforcing.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, ensure};
use wsguard_common::Reason;
use wsguard_tests::{
    Agent, Lab,
    peers::{EchoServer, connects, ws_connect},
    wait_until,
};

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_config_and_refuses_a_bad_one() -> Result<()> {
    let lab = Lab::new()?;
    let _server = EchoServer::start(&lab.server, 8080).await?;
    let body = |deny: &str| {
        format!("[protect]\nports = [8080]\n[ban]\nafter_drops = 0\n[lists]\ndeny = [{deny}]\n")
    };
    let agent = Agent::start(&lab, &body(""))?;
    let addr = SocketAddr::new(lab.server_v4().into(), 8080);
    let source = lab.client_v4(9).into();
    ws_connect(&lab.client, source, addr, SECOND).await?;

    // Deny the source in the file, then SIGHUP: the next connection is dropped.
    let header = std::fs::read_to_string(agent.config_file.path())?;
    let header = &header[..header.find("[protect]").unwrap()];
    std::fs::write(
        agent.config_file.path(),
        format!("{header}{}", body(&format!("\"{}/32\"", lab.client_v4(9)))),
    )?;
    agent.signal(libc::SIGHUP);
    wait_until("the reload to be reported", 5 * SECOND, || {
        agent
            .stdout()
            .iter()
            .any(|l| l.starts_with("wsguard: reloaded"))
            .then_some(())
    })
    .await?;
    ensure!(
        !connects(&lab.client, source, addr, Duration::from_millis(900)).await,
        "denied after reload, yet connected"
    );
    agent.wait_counter(Reason::DenyList, 1, SECOND).await?;

    // A broken file is refused with file and line; the deny keeps working.
    std::fs::write(
        agent.config_file.path(),
        format!("{header}[protect]\nports = [0]\n"),
    )?;
    agent.signal(libc::SIGHUP);
    let path = agent.config_file.path().display().to_string();
    wait_until("the refusal to be logged", 5 * SECOND, || {
        agent
            .stderr()
            .iter()
            .any(|l| {
                l.contains("reload rejected")
                    && l.contains(&path)
                    && l.contains("port 0 is out of range")
            })
            .then_some(())
    })
    .await?;
    let before = agent.counter(Reason::DenyList).packets;
    ensure!(
        !connects(&lab.client, source, addr, Duration::from_millis(900)).await,
        "the old config stopped enforcing"
    );
    ensure!(agent.counter(Reason::DenyList).packets > before);
    // Changing what needs a restart is refused too.
    std::fs::write(
        agent.config_file.path(),
        header.replace(&lab.server_if, "lo") + &body(""),
    )?;
    agent.signal(libc::SIGHUP);
    wait_until("the restart-only change to be refused", 5 * SECOND, || {
        agent
            .stderr()
            .iter()
            .any(|l| l.contains("agent.interfaces changed; these take effect only on restart"))
            .then_some(())
    })
    .await?;
    let (status, _) = agent.stop()?;
    ensure!(status.success());
    Ok(())
}
