//! `bench link` (in progress).

pub async fn run(_json: bool) -> anyhow::Result<()> {
    anyhow::bail!("the link benchmark is not built yet")
}
