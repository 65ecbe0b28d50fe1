//! One pass over every HelmRelease (`continuum-agent hr-recovery --once`), for
//! operators replacing the CronJob.

use jiff::Timestamp;
use kube::api::{Api, ListParams};

use super::actions::Error;
use super::controller::{process, Ctx, Outcome};
use super::model::HelmRelease;

/// One line per HelmRelease that needed attention, plus whether the guardrail tripped.
#[derive(Debug, Default)]
pub struct PassReport {
    pub lines: Vec<String>,
    pub acted: usize,
    pub guardrail_tripped: bool,
    pub errors: usize,
}

pub async fn run_once(ctx: &Ctx) -> Result<PassReport, Error> {
    let api: Api<HelmRelease> = Api::all(ctx.client.clone());
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(Error::List)?;
    let mut report = PassReport::default();
    for hr in &list.items {
        let id = format!(
            "{}/{}",
            hr.metadata.namespace.as_deref().unwrap_or(""),
            hr.metadata.name.as_deref().unwrap_or("")
        );
        let now = Timestamp::now();
        let line = match process(ctx, hr, now).await {
            Ok(Outcome::Healthy) | Ok(Outcome::AlreadyDone) => None,
            Ok(Outcome::Wait(t)) => Some(format!("{id}: stuck, eligible at {t}")),
            Ok(Outcome::Skipped(r)) => Some(format!("{id}: skipped ({r})")),
            Ok(Outcome::Acted(b)) => {
                report.acted += 1;
                Some(format!("{id}: recovered ({})", b.label()))
            }
            Ok(Outcome::WouldAct(b)) => {
                report.acted += 1;
                Some(format!("{id}: would recover ({})", b.label()))
            }
            Ok(Outcome::Blocked(b)) => {
                report.guardrail_tripped = true;
                Some(format!(
                    "{id}: NOT recovered ({}): guardrail tripped",
                    b.label()
                ))
            }
            Err(e) => {
                report.errors += 1;
                Some(format!("{id}: error: {e}"))
            }
        };
        report.lines.extend(line);
    }
    Ok(report)
}
