//! `bench witness` (in progress).

pub async fn run(_json: bool) -> anyhow::Result<()> {
    anyhow::bail!("the witness benchmark is not built yet")
}
