//! Pure decisions of the PostgreSQL back-end: state in, verdict out.

use super::Lsn;

/// A standby name no real standby uses: while it is the only synchronous
/// standby, no commit can ever be acknowledged (the fence).
pub const FENCE_STANDBY_NAME: &str = "continuum-fenced-no-such-standby";

/// `synchronous_standby_names` value that fences the server.
pub fn fenced_standby_names() -> String {
    synchronous_standby_names(Some(FENCE_STANDBY_NAME))
}

/// `synchronous_standby_names` for exactly one named synchronous standby
/// (`FIRST 1`, strict), or empty for asynchronous replication.
pub fn synchronous_standby_names(standby: Option<&str>) -> String {
    match standby {
        Some(name) => format!("FIRST 1 (\"{}\")", name.replace('"', "\"\"")),
        None => String::new(),
    }
}

/// The settings a fenced server runs with, as (name, value).
pub fn fence_settings() -> [(&'static str, String); 2] {
    [
        ("synchronous_standby_names", fenced_standby_names()),
        ("default_transaction_read_only", "on".to_string()),
    ]
}

/// Whether live settings show the fence in place.
pub fn is_fenced(synchronous_standby_names: &str, default_transaction_read_only: &str) -> bool {
    synchronous_standby_names.contains(FENCE_STANDBY_NAME) && default_transaction_read_only == "on"
}

/// What a standby reports about its WAL positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyStatus {
    pub in_recovery: bool,
    /// Last WAL position received and flushed by streaming (None if nothing
    /// was streamed since the server started).
    pub received: Option<Lsn>,
    /// Last WAL position replayed.
    pub replayed: Option<Lsn>,
}

/// Whether a standby may be promoted without losing WAL it already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Everything received has been replayed (invariant 4).
    CaughtUp { at: Lsn },
    /// Replay is behind what was received.
    Behind { bytes: u64 },
    /// Not in recovery: already a primary.
    NotStandby,
    /// In recovery but no replay position yet (still starting).
    Unknown,
}

impl CatchUp {
    pub fn caught_up(self) -> bool {
        matches!(self, CatchUp::CaughtUp { .. })
    }
}

/// Decide catch-up from one status sample. A standby that has streamed
/// nothing since it started has nothing received to wait for; promotion
/// itself still replays all WAL present in pg_wal before it ends recovery.
pub fn catch_up(status: &StandbyStatus) -> CatchUp {
    if !status.in_recovery {
        return CatchUp::NotStandby;
    }
    match (status.received, status.replayed) {
        (_, None) => CatchUp::Unknown,
        (None, Some(replayed)) => CatchUp::CaughtUp { at: replayed },
        (Some(received), Some(replayed)) if replayed >= received => {
            CatchUp::CaughtUp { at: replayed }
        }
        (Some(received), Some(replayed)) => CatchUp::Behind {
            bytes: received.bytes_after(replayed),
        },
    }
}

/// One row of `pg_stat_replication` on a primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationRow {
    pub application_name: String,
    pub state: String,
    pub sync_state: String,
    pub flush: Option<Lsn>,
    pub replay: Option<Lsn>,
}

/// A standby that is synchronous right now, with what it has confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStandby {
    pub application_name: String,
    pub flush: Option<Lsn>,
    pub replay: Option<Lsn>,
}

/// The standbys that are synchronous right now: streaming and `sync_state =
/// 'sync'` (or `quorum`). Sorted by name so the answer is deterministic.
pub fn sync_standbys(rows: &[ReplicationRow]) -> Vec<SyncStandby> {
    let mut out: Vec<SyncStandby> = rows
        .iter()
        .filter(|r| r.state == "streaming" && (r.sync_state == "sync" || r.sync_state == "quorum"))
        .map(|r| SyncStandby {
            application_name: r.application_name.clone(),
            flush: r.flush,
            replay: r.replay,
        })
        .collect();
    out.sort_by(|a, b| a.application_name.cmp(&b.application_name));
    out
}

/// Whether the primary's settings make every acknowledged commit visible on
/// a synchronous standby: `remote_apply` and a non-empty standby list.
pub fn strict_sync(synchronous_commit: &str, synchronous_standby_names: &str) -> bool {
    synchronous_commit == "remote_apply" && !synchronous_standby_names.trim().is_empty()
}

/// What a server that was primary does when it comes back (invariant 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RejoinInput {
    /// Epoch this server last held the lease under.
    pub local_epoch: u64,
    /// Highest epoch seen at the witnesses.
    pub cluster_epoch: u64,
    /// Whether this region holds the lease right now.
    pub holds_lease: bool,
    /// Whether automatic rebuild as a standby is allowed by configuration.
    pub rebuild_allowed: bool,
    /// Whether pg_rewind can work (wal_log_hints or data checksums).
    pub rewind_supported: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejoinAction {
    /// Still the lease holder of the current epoch: may act as primary.
    ActAsPrimary,
    /// Keep refusing writes; a human or a later pass decides.
    StayFenced,
    /// Rewind onto the new primary's timeline and follow it.
    RewindAsStandby,
    /// Replace the data directory with a fresh base backup of the new primary.
    BasebackupAsStandby,
}

/// Decide a returning server's course. It never resumes as primary unless
/// it holds the lease of the highest epoch.
pub fn rejoin(input: RejoinInput) -> RejoinAction {
    if input.holds_lease && input.local_epoch >= input.cluster_epoch {
        return RejoinAction::ActAsPrimary;
    }
    if input.cluster_epoch <= input.local_epoch || !input.rebuild_allowed {
        return RejoinAction::StayFenced;
    }
    if input.rewind_supported {
        RejoinAction::RewindAsStandby
    } else {
        RejoinAction::BasebackupAsStandby
    }
}

/// Rewrite the text of `postgresql.auto.conf`: drop lines setting any of
/// `remove` or `set`, then append `set` as `name = 'value'` lines in the
/// form ALTER SYSTEM writes.
pub fn rewrite_auto_conf(text: &str, set: &[(&str, String)], remove: &[&str]) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let key = line
            .split_once('=')
            .map(|(k, _)| k.trim())
            .unwrap_or_else(|| line.trim());
        let drop = remove.iter().any(|r| r.eq_ignore_ascii_case(key))
            || set.iter().any(|(k, _)| k.eq_ignore_ascii_case(key));
        if !drop {
            out.push_str(line);
            out.push('\n');
        }
    }
    for (k, v) in set {
        let escaped = v.replace('\\', "\\\\").replace('\'', "''");
        out.push_str(&format!("{k} = '{escaped}'\n"));
    }
    out
}

/// What `pg_controldata` says about a data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    /// "Database cluster state", e.g. `shut down`, `in production`.
    pub state: String,
    /// "Latest checkpoint location".
    pub checkpoint: Lsn,
    /// "Latest checkpoint's TimeLineID".
    pub timeline: u32,
}

impl ControlData {
    /// Shut down cleanly as a primary: the last WAL record is the shutdown
    /// checkpoint (a standby shut down reads `shut down in recovery`).
    pub fn clean_primary_shutdown(&self) -> bool {
        self.state == "shut down"
    }
}

/// Parses `pg_controldata` output (run with `LC_ALL=C`).
pub fn parse_controldata(text: &str) -> Option<ControlData> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
    };
    Some(ControlData {
        state: field("Database cluster state")?.to_string(),
        checkpoint: field("Latest checkpoint location")?.parse().ok()?,
        timeline: field("Latest checkpoint's TimeLineID")?.parse().ok()?,
    })
}

/// Whether a server whose WAL ends with the record at `checkpoint` on
/// timeline `tli` can stream from a server on timeline `source_tli` with
/// timeline history `history` (the `<source_tli>.history` file: lines of
/// `parent_tli<TAB>switchpoint<TAB>reason`) without pg_rewind: either they
/// share the timeline, or `tli` is an ancestor whose switch point lies after
/// that last record (the successor replayed it before forking).
pub fn follows_without_rewind(tli: u32, checkpoint: Lsn, source_tli: u32, history: &str) -> bool {
    if tli == source_tli {
        return true;
    }
    history.lines().any(|line| {
        let mut f = line.split_whitespace();
        let parent = f.next().and_then(|t| t.parse::<u32>().ok());
        let switch = f.next().and_then(|l| l.parse::<Lsn>().ok());
        matches!((parent, switch), (Some(p), Some(sw)) if p == tli && checkpoint < sw)
    })
}

/// `conninfo` (either libpq form) with `application_name` set to `app`, the
/// name the primary's `synchronous_standby_names` lists: a trailing keyword
/// or URI parameter, which libpq lets override an earlier one. `app` is a
/// region id (a DNS label), so it needs no quoting.
pub fn with_application_name(conninfo: &str, app: &str) -> String {
    let c = conninfo.trim();
    if c.starts_with("postgresql://") || c.starts_with("postgres://") {
        let sep = if c.contains('?') { '&' } else { '?' };
        format!("{c}{sep}application_name={app}")
    } else if c.is_empty() {
        format!("application_name={app}")
    } else {
        format!("{c} application_name={app}")
    }
}

/// The postmaster's pid: the first line of `postmaster.pid`. `None` unless
/// it is a plain positive number (the value goes into a `kill` command
/// line). 1 is valid: in a container the postmaster is often the init.
pub fn postmaster_pid(pid_file: &str) -> Option<u32> {
    let first = pid_file.lines().next()?.trim();
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    first.parse::<u32>().ok().filter(|p| *p > 0)
}

/// A string literal for SQL text (standard_conforming_strings, the default
/// since PostgreSQL 9.1): single quotes doubled.
pub fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controldata_and_timeline_checks() {
        let out = "pg_control version number:            1300\n\
Database cluster state:               shut down\n\
Latest checkpoint location:           0/3000028\n\
Latest checkpoint's REDO location:    0/3000028\n\
Latest checkpoint's TimeLineID:       1\n";
        let c = parse_controldata(out).expect("parses");
        assert!(c.clean_primary_shutdown());
        assert_eq!(c.checkpoint, Lsn(0x300_0028));
        assert_eq!(c.timeline, 1);
        let mut standby = c.clone();
        standby.state = "shut down in recovery".into();
        assert!(!standby.clean_primary_shutdown());
        assert_eq!(parse_controldata("garbage"), None);
        let hist = "1\t0/30000A0\tno recovery target specified\n";
        let cases = [
            (1, 0x300_0028, 2, hist, true, "checkpoint before the fork"),
            (
                1,
                0x300_00A0,
                2,
                hist,
                false,
                "checkpoint at the fork: diverged",
            ),
            (1, 0x400_0000, 2, hist, false, "WAL past the fork"),
            (2, 0x400_0000, 2, "", true, "same timeline"),
            (3, 0x100, 2, hist, false, "not an ancestor"),
            (
                1,
                0x100,
                3,
                "1\t0/200\tx\n2\t0/5000\ty\n",
                true,
                "grand-parent",
            ),
        ];
        for (tli, ckpt, src, h, want, why) in cases {
            assert_eq!(
                follows_without_rewind(tli, Lsn(ckpt), src, h),
                want,
                "{why}"
            );
        }
    }

    fn st(in_recovery: bool, received: Option<u64>, replayed: Option<u64>) -> StandbyStatus {
        StandbyStatus {
            in_recovery,
            received: received.map(Lsn),
            replayed: replayed.map(Lsn),
        }
    }

    #[test]
    fn catch_up_table() {
        let cases = [
            (st(false, Some(10), Some(10)), CatchUp::NotStandby),
            (st(true, Some(10), None), CatchUp::Unknown),
            (st(true, None, None), CatchUp::Unknown),
            (st(true, None, Some(7)), CatchUp::CaughtUp { at: Lsn(7) }),
            (
                st(true, Some(10), Some(10)),
                CatchUp::CaughtUp { at: Lsn(10) },
            ),
            // Replay can pass the received position (WAL read from pg_wal).
            (
                st(true, Some(10), Some(12)),
                CatchUp::CaughtUp { at: Lsn(12) },
            ),
            (st(true, Some(10), Some(4)), CatchUp::Behind { bytes: 6 }),
        ];
        for (status, want) in cases {
            assert_eq!(catch_up(&status), want, "{status:?}");
        }
        assert!(!CatchUp::Behind { bytes: 1 }.caught_up());
        assert!(CatchUp::CaughtUp { at: Lsn(0) }.caught_up());
    }

    fn row(name: &str, state: &str, sync: &str) -> ReplicationRow {
        ReplicationRow {
            application_name: name.into(),
            state: state.into(),
            sync_state: sync.into(),
            flush: Some(Lsn(5)),
            replay: Some(Lsn(4)),
        }
    }

    #[test]
    fn sync_standby_is_streaming_and_sync() {
        let rows = [
            row("c", "streaming", "async"),
            row("b", "streaming", "sync"),
            row("d", "catchup", "sync"),
            row("e", "streaming", "potential"),
        ];
        let got = sync_standbys(&rows);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].application_name, "b");
        assert_eq!(got[0].replay, Some(Lsn(4)));
        assert!(sync_standbys(&[]).is_empty());
    }

    #[test]
    fn standby_names_are_quoted_and_strict() {
        assert_eq!(
            synchronous_standby_names(Some("region-b")),
            "FIRST 1 (\"region-b\")"
        );
        assert_eq!(
            synchronous_standby_names(Some("a\"b")),
            "FIRST 1 (\"a\"\"b\")"
        );
        assert_eq!(synchronous_standby_names(None), "");
        assert!(strict_sync("remote_apply", "FIRST 1 (\"b\")"));
        assert!(!strict_sync("on", "FIRST 1 (\"b\")"));
        assert!(!strict_sync("remote_apply", " "));
        assert!(is_fenced(&fenced_standby_names(), "on"));
        assert!(!is_fenced(&fenced_standby_names(), "off"));
        assert!(!is_fenced("FIRST 1 (\"b\")", "on"));
    }

    #[test]
    fn rejoin_never_resumes_without_the_lease() {
        let base = RejoinInput {
            local_epoch: 3,
            cluster_epoch: 4,
            holds_lease: false,
            rebuild_allowed: true,
            rewind_supported: true,
        };
        let cases = [
            (base, RejoinAction::RewindAsStandby),
            (
                RejoinInput {
                    rewind_supported: false,
                    ..base
                },
                RejoinAction::BasebackupAsStandby,
            ),
            (
                RejoinInput {
                    rebuild_allowed: false,
                    ..base
                },
                RejoinAction::StayFenced,
            ),
            // Holding the lease of an older epoch is not holding it.
            (
                RejoinInput {
                    holds_lease: true,
                    ..base
                },
                RejoinAction::RewindAsStandby,
            ),
            (
                RejoinInput {
                    holds_lease: true,
                    cluster_epoch: 3,
                    ..base
                },
                RejoinAction::ActAsPrimary,
            ),
            // Same epoch, lease not held: nothing newer to follow, stay fenced.
            (
                RejoinInput {
                    cluster_epoch: 3,
                    ..base
                },
                RejoinAction::StayFenced,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(rejoin(input), want, "{input:?}");
        }
    }

    #[test]
    fn auto_conf_rewrite_replaces_and_removes() {
        let text = "# Do not edit this file manually!\nsynchronous_standby_names = 'FIRST 1 (\"b\")'\nwork_mem = '8MB'\nprimary_conninfo = 'x'\n";
        let out = rewrite_auto_conf(
            text,
            &[
                ("synchronous_standby_names", fenced_standby_names()),
                ("x", "it's".into()),
            ],
            &["primary_conninfo"],
        );
        assert_eq!(
            out,
            format!(
                "# Do not edit this file manually!\nwork_mem = '8MB'\nsynchronous_standby_names = '{}'\nx = 'it''s'\n",
                fenced_standby_names()
            )
        );
    }

    #[test]
    fn application_name_is_appended_in_either_form() {
        let cases = [
            (
                "host=b port=5432 user=r",
                "host=b port=5432 user=r application_name=a",
            ),
            (
                "host=b application_name=x",
                "host=b application_name=x application_name=a",
            ),
            (
                "postgresql://r@b:5432/postgres",
                "postgresql://r@b:5432/postgres?application_name=a",
            ),
            (
                "postgres://r@b/db?sslmode=require",
                "postgres://r@b/db?sslmode=require&application_name=a",
            ),
            ("  host=b  ", "host=b application_name=a"),
            ("", "application_name=a"),
        ];
        for (input, want) in cases {
            assert_eq!(with_application_name(input, "a"), want, "{input:?}");
        }
    }

    #[test]
    fn postmaster_pid_is_a_plain_number() {
        let cases = [
            (
                "4017\n/var/lib/postgresql/15/main\n1700000000\n5432\n",
                Some(4017),
            ),
            ("4017", Some(4017)),
            (" 77 \n", Some(77)),
            ("1\n", Some(1)),
            ("0\n", None),
            ("-5\n", None),
            ("12; rm -rf /\n", None),
            ("99999999999\n", None),
            ("", None),
            ("\n4017", None),
        ];
        for (text, want) in cases {
            assert_eq!(postmaster_pid(text), want, "{text:?}");
        }
    }

    #[test]
    fn sql_literals_double_quotes() {
        assert_eq!(sql_literal("/var/lib/pg"), "'/var/lib/pg'");
        assert_eq!(sql_literal("it's"), "'it''s'");
        assert_eq!(sql_literal("a\\b"), "'a\\b'");
    }
}
