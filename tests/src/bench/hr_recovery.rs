//! `bench hr_recovery` (in progress).

pub async fn run(_json: bool) -> anyhow::Result<()> {
    anyhow::bail!("the hr_recovery benchmark is not built yet")
}
