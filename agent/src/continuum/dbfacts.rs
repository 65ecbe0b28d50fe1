//! What the running database says, when the Continuum names a connection to
//! its region's Cluster (`regions[].cnpg.connectionSecretRef`).
//!
//! The Cluster's spec says what CNPG *will* configure; the running primary
//! may not have applied it yet. Recording a standby as synchronous at the
//! witnesses before the primary waits for it would let that standby promote
//! without commits the primary already acknowledged (invariant 3), so with a
//! connection the decision reads the applied `synchronous_standby_names`.
//! The same round trip gives the confirmed LSN for the lease metadata, the
//! replay position for `lastFailover.lsnAtPromotion`, and whether the peer
//! streams (region health).

use continuum_shared::failover::DbState;
use continuum_shared::lease::HolderId;
use continuum_shared::pg::backend as pg;
use continuum_shared::pg::{Lsn, PgError};

use super::cnpg::Names;
use crate::failover::observe::required_standby as parse_standby_names;

/// One round trip's worth of facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbFacts {
    pub in_recovery: bool,
    /// `synchronous_standby_names` as the server runs with it.
    pub synchronous_standby_names: String,
    /// The peer's Cluster streams from this server (`pg_stat_replication`;
    /// needs a role with `pg_monitor` or the superuser to see other roles'
    /// rows).
    pub peer_streaming: bool,
    /// The role may read other roles' `pg_stat_replication` rows
    /// (`pg_read_all_stats`, part of `pg_monitor`, or superuser). Without
    /// it `peer_streaming` is always false and is not used.
    pub sees_replication: bool,
    /// What the peer has applied (primary side): the confirmed LSN.
    pub peer_replay: Option<Lsn>,
    /// This server's replay position (standby side).
    pub replay: Option<Lsn>,
}

/// Reads the facts over `conninfo`, naming the peer by its Cluster name
/// (its `application_name`).
pub async fn read(conninfo: &str, peer_cluster: &str) -> Result<DbFacts, PgError> {
    let client = pg::connect(conninfo).await?;
    read_on(&client, peer_cluster).await
}

/// [`read`] on an open connection.
pub async fn read_on(client: &pg::Client, peer_cluster: &str) -> Result<DbFacts, PgError> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('synchronous_standby_names'), \
                    (SELECT replay_lsn::text FROM pg_stat_replication \
                      WHERE application_name = $1 AND state = 'streaming' \
                      ORDER BY replay_lsn DESC NULLS LAST LIMIT 1), \
                    (SELECT count(*) FROM pg_stat_replication \
                      WHERE application_name = $1 AND state = 'streaming'), \
                    pg_last_wal_replay_lsn()::text, \
                    pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')",
            &[&peer_cluster],
        )
        .await
        .map_err(|source| PgError::Query {
            what: "database facts",
            source,
        })?;
    let in_recovery: bool = pg::col(&row, 0)?;
    let streaming: i64 = pg::col(&row, 3)?;
    Ok(DbFacts {
        in_recovery,
        synchronous_standby_names: pg::col::<Option<String>>(&row, 1)?.unwrap_or_default(),
        peer_streaming: streaming > 0,
        sees_replication: pg::col(&row, 5)?,
        peer_replay: pg::lsn_opt(pg::col(&row, 2)?)?,
        replay: if in_recovery {
            pg::lsn_opt(pg::col(&row, 4)?)?
        } else {
            None
        },
    })
}

/// The region the running server waits for on every commit: the
/// `synchronous_standby_names` list must be exactly the peer's Cluster.
pub fn applied_standby(facts: &DbFacts, names: &Names) -> Option<HolderId> {
    if facts.in_recovery {
        return None;
    }
    let name = parse_standby_names(&facts.synchronous_standby_names)?;
    names.region_of(name.as_str())
}

/// The decision's view of the database with the running server's facts
/// folded in. `applied` is the standby the server was last seen to require
/// (`None` before the first successful read): a spec CNPG has not applied
/// yet, or a server that does not answer, never counts as requiring a
/// standby. Peer attachment comes from replication when it was read.
pub fn with_facts(
    mut db: DbState,
    facts: Option<&DbFacts>,
    applied: Option<&Option<HolderId>>,
) -> DbState {
    if db.primary {
        db.required_standby = applied.cloned().flatten();
        if let Some(f) = facts.filter(|f| !f.in_recovery && f.sees_replication) {
            db.peer_attached = db.peer_attached && f.peer_streaming;
        }
    }
    if let Some(f) = facts {
        db.replay_lsn = f.replay.map(|l| l.0);
    }
    db
}

#[cfg(test)]
mod tests {
    use super::*;
    use continuum_shared::lease::Epoch;

    fn h(s: &str) -> HolderId {
        HolderId::new(s).expect("valid holder")
    }

    fn names() -> Names {
        Names {
            region: h("a"),
            peer: h("b"),
            local_cluster: "pg-a".into(),
            peer_cluster: "pg-b".into(),
        }
    }

    fn facts(names: &str, streaming: bool) -> DbFacts {
        DbFacts {
            in_recovery: false,
            synchronous_standby_names: names.into(),
            peer_streaming: streaming,
            sees_replication: true,
            peer_replay: Some(Lsn(42)),
            replay: None,
        }
    }

    #[test]
    fn applied_standby_table() {
        let cases = [
            ("FIRST 1 (\"pg-b\")", Some("b")),
            ("ANY 1 (\"pg-b\")", Some("b")),
            ("pg-b", Some("b")),
            ("", None),
            // CNPG's list with local pods: one of them may stand in.
            ("FIRST 1 (\"pg-b\",\"pg-a-2\",\"pg-a-3\")", None),
            ("FIRST 1 (\"pg-a-2\")", None),
            ("FIRST 1 (\"other\")", None),
        ];
        for (list, want) in cases {
            assert_eq!(
                applied_standby(&facts(list, true), &names()),
                want.map(h),
                "{list}"
            );
        }
        let mut standby = facts("FIRST 1 (\"pg-b\")", true);
        standby.in_recovery = true;
        assert_eq!(
            applied_standby(&standby, &names()),
            None,
            "a standby requires nobody"
        );
    }

    #[test]
    fn the_spec_alone_never_makes_a_standby_required() {
        let spec_says_b = DbState {
            primary: true,
            fenced: false,
            epoch: Epoch(1),
            required_standby: Some(h("b")),
            peer_attached: true,
            replay_lsn: None,
        };
        // Never read, or last read before CNPG applied the spec.
        assert_eq!(
            with_facts(spec_says_b.clone(), None, None).required_standby,
            None
        );
        assert_eq!(
            with_facts(spec_says_b.clone(), None, Some(&None)).required_standby,
            None
        );
        let f = facts("FIRST 1 (\"pg-b\")", true);
        let seen = with_facts(spec_says_b.clone(), Some(&f), Some(&Some(h("b"))));
        assert_eq!(seen.required_standby, Some(h("b")));
        assert!(seen.peer_attached);
        // The peer does not stream: not attached, whatever the annotation.
        let f = facts("FIRST 1 (\"pg-b\")", false);
        let seen = with_facts(spec_says_b.clone(), Some(&f), Some(&Some(h("b"))));
        assert!(!seen.peer_attached);
        // A role that cannot see replication rows says nothing about them.
        let blind = DbFacts {
            sees_replication: false,
            ..f
        };
        let seen = with_facts(spec_says_b, Some(&blind), Some(&Some(h("b"))));
        assert!(seen.peer_attached, "unknown, not detached");
    }

    #[test]
    fn standby_side_reports_its_replay_position() {
        let db = DbState {
            primary: false,
            fenced: false,
            epoch: Epoch(1),
            required_standby: None,
            peer_attached: true,
            replay_lsn: None,
        };
        let f = DbFacts {
            in_recovery: true,
            synchronous_standby_names: String::new(),
            peer_streaming: false,
            sees_replication: true,
            peer_replay: None,
            replay: Some(Lsn(7)),
        };
        let seen = with_facts(db, Some(&f), None);
        assert_eq!(seen.replay_lsn, Some(7));
        assert!(
            seen.peer_attached,
            "a standby's attachment is not its to judge"
        );
    }
}
