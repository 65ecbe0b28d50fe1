//! `continuum-agent switchover`: a planned switchover (or failback) in one
//! command, direct-PostgreSQL regions. See docs/switchover.md.
//!
//! The command holds no state and makes no decision that matters for
//! safety: it reads each agent's `GET /failover/status`, asks the primary's
//! agent to hand over (`POST /failover/handover?to=`), and waits until the
//! target reports itself primary at a newer epoch. The agents and the
//! witnesses do the rest (`failover::decide`), so killing the command at any
//! point changes nothing, and running it again continues or confirms.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// `continuum-agent switchover`.
#[derive(Debug, Clone, clap::Args)]
pub struct SwitchoverArgs {
    /// Region that should become primary.
    #[arg(long, env = "CONTINUUM_SWITCHOVER_TO")]
    pub to: String,
    /// Direct PostgreSQL: admin endpoint base URL (`http://host:port`, the
    /// agents' `--admin-listen`) of each region's agent; repeat or
    /// comma-separate.
    #[arg(
        long = "agent",
        env = "CONTINUUM_AGENTS",
        value_delimiter = ',',
        required_unless_present = "continuum",
        conflicts_with = "continuum"
    )]
    pub agents: Vec<String>,
    /// CloudNativePG: name of the Continuum resource. Run against the OLD
    /// primary's Kubernetes cluster (kubeconfig, in-cluster config, or
    /// --kube-url): its copy gets the `dr.openova.io/switchover-to`
    /// annotation its controller acts on.
    #[arg(long, env = "CONTINUUM_NAME")]
    pub continuum: Option<String>,
    /// Namespace of the Continuum resource.
    #[arg(long, env = "CONTINUUM_NAMESPACE", default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub kube: crate::cli::KubeArgs,
    /// Give up after this many seconds (the handover itself goes on or is
    /// abandoned by the agents; run the command again to see where it is).
    #[arg(long, env = "CONTINUUM_SWITCHOVER_TIMEOUT_S", default_value_t = 60)]
    pub timeout_s: u64,
}

/// A bare HTTP/1.1 exchange (no TLS: the admin endpoint is local-only).
async fn http(method: &str, url: &str, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    let hostport = url
        .trim_end_matches('/')
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http://host:port admin URLs are supported"))?;
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(hostport).await?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("{url}: no answer within 5 s"))?
        .with_context(|| format!("{url}{path}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("{url}{path}: not an HTTP response"))?;
    // The body may be chunked; the JSON document is the line starting with '{'.
    let json = body
        .lines()
        .find(|l| l.trim_start().starts_with('{'))
        .and_then(|l| serde_json::from_str(l.trim()).ok())
        .unwrap_or(serde_json::Value::Null);
    Ok((code, json))
}

async fn statuses(agents: &[String]) -> Vec<(String, Option<serde_json::Value>)> {
    let mut out = Vec::new();
    for a in agents {
        let s = match http("GET", a, "/failover/status").await {
            Ok((200, v)) => Some(v),
            Ok((code, _)) => {
                tracing::warn!(agent = %a, code, "status not available");
                None
            }
            Err(e) => {
                tracing::warn!(agent = %a, error = %e, "agent not reachable");
                None
            }
        };
        out.push((a.clone(), s));
    }
    out
}

fn is_primary(s: &serde_json::Value) -> bool {
    s["role"] == "primary" && s["holding"] == true
}

/// Entry point of `continuum-agent switchover`.
pub fn run(args: SwitchoverArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: SwitchoverArgs) -> anyhow::Result<()> {
    if let Some(name) = &args.continuum {
        let started = Instant::now();
        let client = args.kube.client().await.context("Kubernetes client")?;
        let requested =
            crate::continuum::switchover::request(&client, &args.namespace, name, &args.to).await?;
        if requested == crate::continuum::switchover::Requested::AlreadyPrimary {
            println!(
                "{}",
                serde_json::json!({
                    "switchover": "not_needed",
                    "continuum": format!("{}/{name}", args.namespace),
                    "to": args.to,
                    "reason": "already the primary region",
                })
            );
            return Ok(());
        }
        let ls = crate::continuum::switchover::wait_done(
            &client,
            &args.namespace,
            name,
            &args.to,
            Duration::from_secs(args.timeout_s.max(1)),
        )
        .await?;
        println!(
            "{}",
            serde_json::json!({
                "switchover": "done",
                "continuum": format!("{}/{name}", args.namespace),
                "to": args.to,
                "elapsed_ms": started.elapsed().as_millis() as u64,
                "last_switchover": ls,
            })
        );
        return Ok(());
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_s.max(1));
    let first = statuses(&args.agents).await;
    let target = |all: &[(String, Option<serde_json::Value>)]| {
        all.iter()
            .filter_map(|(_, s)| s.clone())
            .find(|s| s["region"] == args.to.as_str())
    };
    let Some(t) = target(&first) else {
        bail!(
            "no agent among {:?} reports region {}",
            args.agents,
            args.to
        );
    };
    let old_epoch = first
        .iter()
        .filter_map(|(_, s)| s.as_ref())
        .filter_map(|s| s["epoch"].as_u64().or(s["max_epoch"].as_u64()))
        .max()
        .unwrap_or(0);
    if is_primary(&t) {
        println!(
            "{}",
            serde_json::json!({"switchover": "nothing to do", "primary": args.to, "epoch": t["epoch"]})
        );
        return Ok(());
    }
    let from = first.iter().find(|(_, s)| {
        s.as_ref()
            .is_some_and(|s| is_primary(s) && s["region"] != args.to.as_str())
    });
    let mut from_region = String::new();
    match from {
        Some((url, s)) => {
            from_region = s.as_ref().map_or(String::new(), |s| {
                s["region"].as_str().unwrap_or("").to_string()
            });
            let (code, body) =
                http("POST", url, &format!("/failover/handover?to={}", args.to)).await?;
            if code != 202 {
                bail!("{url} refused the handover ({code}): {body}");
            }
            tracing::info!(from = %from_region, to = %args.to, epoch = old_epoch, "handover requested");
        }
        None => {
            // No primary right now: a handover may already be under way
            // (a re-run). Wait for the target below.
            tracing::info!(to = %args.to, "no region reports itself primary; waiting for a handover in progress");
        }
    }
    loop {
        let all = statuses(&args.agents).await;
        if let Some(t) = target(&all) {
            if is_primary(&t) && t["epoch"].as_u64().unwrap_or(0) > old_epoch {
                let old = all
                    .iter()
                    .filter_map(|(_, s)| s.as_ref())
                    .find(|s| s["region"] != args.to.as_str())
                    .cloned()
                    .unwrap_or(serde_json::Value::Null);
                println!(
                    "{}",
                    serde_json::json!({
                        "switchover": "done",
                        "from": from_region,
                        "to": args.to,
                        "old_epoch": old_epoch,
                        "new_epoch": t["epoch"],
                        "elapsed_ms": started.elapsed().as_millis() as u64,
                        "old_primary_role": old["role"],
                    })
                );
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            let show: Vec<serde_json::Value> = all.into_iter().filter_map(|(_, s)| s).collect();
            bail!(
                "{} did not become primary within {} s; agents report: {}",
                args.to,
                args.timeout_s,
                serde_json::Value::Array(show)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: SwitchoverArgs,
    }

    #[test]
    fn direct_or_cnpg_mode_is_required_and_exclusive() {
        let ok =
            Cli::try_parse_from(["x", "--to", "b", "--agent", "http://a:1,http://b:2"]).unwrap();
        assert_eq!(ok.args.agents.len(), 2);
        assert!(ok.args.continuum.is_none());
        let cnpg =
            Cli::try_parse_from(["x", "--to", "b", "--continuum", "app", "--namespace", "db"])
                .unwrap();
        assert_eq!(cnpg.args.continuum.as_deref(), Some("app"));
        assert_eq!(cnpg.args.namespace, "db");
        for bad in [
            vec!["x", "--to", "b"],
            vec!["x", "--agent", "http://a:1"],
            vec![
                "x",
                "--to",
                "b",
                "--agent",
                "http://a:1",
                "--continuum",
                "app",
            ],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
        }
    }

    /// The command's HTTP exchange against the real admin endpoint.
    #[tokio::test]
    async fn talks_to_the_admin_endpoint() {
        use continuum_shared::lease::HolderId;
        let admin = std::sync::Arc::new(std::sync::Mutex::new(super::super::admin::AdminShared {
            region: HolderId::new("a").unwrap(),
            peer: HolderId::new("b").unwrap(),
            request: None,
            status: serde_json::json!({"region": "a", "role": "primary", "holding": true, "epoch": 3}),
        }));
        let (addr, task) =
            super::super::admin::serve("127.0.0.1:0".parse().unwrap(), admin.clone())
                .await
                .unwrap();
        let url = format!("http://{addr}");
        let (code, st) = http("GET", &url, "/failover/status").await.unwrap();
        assert_eq!(code, 200);
        assert!(is_primary(&st));
        let (code, body) = http("POST", &url, "/failover/handover?to=b").await.unwrap();
        assert_eq!(code, 202, "{body}");
        assert!(admin.lock().unwrap().request.is_some());
        let (code, _) = http("POST", &url, "/failover/handover?to=zz")
            .await
            .unwrap();
        assert_eq!(code, 400);
        assert!(
            http("GET", "https://x:1", "/").await.is_err(),
            "only http:// URLs"
        );
        task.abort();
    }
}
