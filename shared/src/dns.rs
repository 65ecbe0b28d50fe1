//! Lease holders published in DNS: the record name and TXT format shared by
//! the witness's publisher and the agents' reader, and the reader itself.
//!
//! DNS has no compare-and-set, so it never arbitrates: the witness publishes
//! what it granted, and a reader asks every authoritative server directly and
//! trusts only an answer a majority of *all configured* servers agree on.
//!
//! # Record name
//!
//! A lease name such as `continuum/db/app` becomes `app.db.continuum.<zone>.`:
//! the `/`-separated segments, reversed (most specific first, as DNS reads),
//! each one a label. Inside a segment `[a-z0-9-]` is kept as is and `_` is an
//! escape character, so that the mapping is injective:
//!
//! | in the lease name | in the label |
//! |-------------------|--------------|
//! | `_`               | `__`         |
//! | `.`               | `_d`         |
//! | empty segment     | `_e`         |
//!
//! (`continuum/db.main/x_y` -> `x__y.db_dmain.continuum.<zone>.`). When a
//! label would exceed 63 bytes or the whole name 253, the name is instead
//! `_h<32 hex digits>.<zone>.`: the first 128 bits of SHA-256 of the lease
//! name. Plain labels never start with `_h` (only `__`, `_d`, `_e`), so the
//! two forms cannot collide either.
//!
//! # TXT content
//!
//! One TXT record per lease, one string: `holder=eu-1 epoch=7`, or
//! `holder= epoch=7` when the lease is free (the epoch of the last grant).
//! Anything else (unknown keys, several records, a bad holder id) makes that
//! server's answer invalid: it counts against a majority, never as a vote.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::ResolveHosts;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;

use crate::lease::{Epoch, HolderId, LeaseName};

/// Longest label in a DNS name (RFC 1035).
const MAX_LABEL: usize = 63;
/// Longest DNS name in text form without the final dot.
const MAX_DNS_NAME: usize = 253;
/// Longest zone accepted, so that the hashed form always fits.
pub const MAX_ZONE_LEN: usize = 200;
/// Longest TXT content a reader accepts (one character-string).
pub const MAX_TXT_LEN: usize = 255;

/// Why a DNS publication setting or answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("invalid DNS zone {zone:?}: {reason}")]
    InvalidZone { zone: String, reason: String },
    #[error("no authoritative DNS server configured")]
    NoServers,
    #[error("invalid TXT record: {0}")]
    InvalidTxt(String),
    #[error("cannot set up the DNS resolver: {0}")]
    Resolver(String),
}

impl DnsError {
    /// Stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DnsError::InvalidZone { .. } => "invalid_zone",
            DnsError::NoServers => "no_servers",
            DnsError::InvalidTxt(_) => "invalid_txt",
            DnsError::Resolver(_) => "resolver",
        }
    }
}

/// A validated DNS zone, lower case, without the final dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Zone(String);

impl Zone {
    /// Accepts `example.org` or `example.org.`; labels of `[a-z0-9_-]`
    /// (upper case is folded), 1..=63 bytes each, at most 200 in all.
    pub fn new(zone: &str) -> Result<Zone, DnsError> {
        let bad = |reason: &str| DnsError::InvalidZone {
            zone: zone.to_string(),
            reason: reason.to_string(),
        };
        let z = zone.strip_suffix('.').unwrap_or(zone).to_ascii_lowercase();
        if z.is_empty() {
            return Err(bad("must not be empty (the root zone is not supported)"));
        }
        if z.len() > MAX_ZONE_LEN {
            return Err(bad(&format!("{} bytes; at most {MAX_ZONE_LEN}", z.len())));
        }
        for label in z.split('.') {
            if label.is_empty() {
                return Err(bad("empty label"));
            }
            if label.len() > MAX_LABEL {
                return Err(bad(&format!("label {label:?} longer than {MAX_LABEL}")));
            }
            if let Some(c) = label
                .chars()
                .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '_'))
            {
                return Err(bad(&format!("character {c:?} not allowed; use [a-z0-9_-]")));
            }
        }
        Ok(Zone(z))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The zone as PowerDNS names it (with the final dot).
    pub fn fqdn(&self) -> String {
        format!("{}.", self.0)
    }

    /// The record name of a lease in this zone, with the final dot.
    pub fn record_name(&self, lease: &LeaseName) -> String {
        let labels: Vec<String> = lease
            .as_str()
            .split('/')
            .rev()
            .map(encode_segment)
            .collect();
        let plain = format!("{}.{}", labels.join("."), self.0);
        if labels.iter().all(|l| l.len() <= MAX_LABEL) && plain.len() <= MAX_DNS_NAME {
            format!("{plain}.")
        } else {
            format!("{}.{}.", hashed_label(lease), self.0)
        }
    }

    /// The lease name a record name stands for, if it is in the plain form
    /// (hashed names cannot be reversed). Inverse of [`Zone::record_name`].
    pub fn lease_name(&self, record: &str) -> Option<String> {
        let record = record.strip_suffix('.').unwrap_or(record);
        let rel = record.strip_suffix(&self.0)?.strip_suffix('.')?;
        let mut segments = Vec::new();
        for label in rel.split('.').rev() {
            segments.push(decode_label(label)?);
        }
        Some(segments.join("/"))
    }
}

impl std::fmt::Display for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn encode_segment(segment: &str) -> String {
    if segment.is_empty() {
        return "_e".to_string();
    }
    let mut out = String::with_capacity(segment.len());
    for c in segment.chars() {
        match c {
            '_' => out.push_str("__"),
            '.' => out.push_str("_d"),
            c => out.push(c),
        }
    }
    out
}

fn decode_label(label: &str) -> Option<String> {
    if label == "_e" {
        return Some(String::new());
    }
    let mut out = String::with_capacity(label.len());
    let mut chars = label.chars();
    while let Some(c) = chars.next() {
        match c {
            '_' => match chars.next()? {
                '_' => out.push('_'),
                'd' => out.push('.'),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    (!out.is_empty()).then_some(out)
}

fn hashed_label(lease: &LeaseName) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, lease.as_str().as_bytes());
    let mut out = String::from("_h");
    for b in &digest.as_ref()[..16] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// What one lease record says: its holder (none when free) and epoch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Published {
    pub holder: Option<HolderId>,
    pub epoch: Epoch,
}

impl Published {
    /// The TXT content, e.g. `holder=eu-1 epoch=7` or `holder= epoch=7`.
    pub fn to_txt(&self) -> String {
        let holder = self.holder.as_ref().map(HolderId::as_str).unwrap_or("");
        format!("holder={holder} epoch={}", self.epoch)
    }

    /// Parses TXT content as written by [`Published::to_txt`]. Strict: the
    /// bytes come from the network, and a reader must not count a vote it
    /// does not fully understand.
    pub fn parse_txt(txt: &[u8]) -> Result<Published, DnsError> {
        let bad = |r: &str| DnsError::InvalidTxt(r.to_string());
        if txt.len() > MAX_TXT_LEN {
            return Err(bad("longer than 255 bytes"));
        }
        let txt = std::str::from_utf8(txt).map_err(|_| bad("not UTF-8"))?;
        let mut holder = None;
        let mut epoch = None;
        for field in txt.split(' ') {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| bad(&format!("field {field:?} is not key=value")))?;
            match key {
                "holder" if holder.is_none() => holder = Some(value),
                "epoch" if epoch.is_none() => epoch = Some(value),
                "holder" | "epoch" => return Err(bad(&format!("field {key:?} repeated"))),
                _ => return Err(bad(&format!("unknown field {key:?}"))),
            }
        }
        let holder = holder.ok_or_else(|| bad("no holder field"))?;
        let epoch = epoch.ok_or_else(|| bad("no epoch field"))?;
        if epoch.is_empty() || epoch.len() > 20 || !epoch.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(&format!("epoch {epoch:?} is not a decimal number")));
        }
        let epoch = Epoch(
            epoch
                .parse::<u64>()
                .map_err(|_| bad(&format!("epoch {epoch:?} out of range")))?,
        );
        let holder = if holder.is_empty() {
            None
        } else {
            Some(HolderId::new(holder).map_err(|e| bad(&format!("holder: {e}")))?)
        };
        if holder.is_some() && epoch == Epoch(0) {
            return Err(bad("a holder with epoch 0"));
        }
        let published = Published { holder, epoch };
        // One spelling per value (field order, no leading zeros), so that
        // equal bytes mean equal answers and the reverse.
        if published.to_txt() != txt {
            return Err(bad("not in canonical form `holder=<id> epoch=<n>`"));
        }
        Ok(published)
    }
}

/// One authoritative server's answer for a lease record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAnswer {
    /// A well-formed record.
    Published(Published),
    /// The server answers, but has no record for the lease.
    Absent,
    /// The server answered something a reader cannot count (malformed TXT,
    /// several records).
    Invalid(String),
    /// No usable answer: timeout, refused, SERVFAIL, network error.
    Unreachable(String),
}

impl ServerAnswer {
    /// Stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            ServerAnswer::Published(_) => "published",
            ServerAnswer::Absent => "absent",
            ServerAnswer::Invalid(_) => "invalid",
            ServerAnswer::Unreachable(_) => "unreachable",
        }
    }
}

/// The answer a majority of all configured servers agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsView {
    pub holder: Option<HolderId>,
    pub epoch: Epoch,
    /// Servers that gave exactly this answer.
    pub agreeing: usize,
    /// Servers asked (configured), whether they answered or not.
    pub total: usize,
}

/// The answers of every server for one lease, and their majority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsReport {
    pub answers: Vec<(SocketAddr, ServerAnswer)>,
    /// `None` when no single published answer has a strict majority of all
    /// configured servers.
    pub majority: Option<DnsView>,
}

impl DnsReport {
    /// Answers with the given label (`invalid`, `unreachable`, ...).
    pub fn count(&self, label: &str) -> usize {
        self.answers
            .iter()
            .filter(|(_, a)| a.label() == label)
            .count()
    }
}

/// The published answer held by a strict majority of `answers`, where every
/// configured server has one entry (unreachable ones included), so that
/// silence never helps a minority.
pub fn majority(answers: &[ServerAnswer]) -> Option<DnsView> {
    let total = answers.len();
    let mut tally: HashMap<&Published, usize> = HashMap::new();
    for a in answers {
        if let ServerAnswer::Published(p) = a {
            *tally.entry(p).or_default() += 1;
        }
    }
    tally
        .into_iter()
        .find(|(_, n)| 2 * n > total)
        .map(|(p, agreeing)| DnsView {
            holder: p.holder.clone(),
            epoch: p.epoch,
            agreeing,
            total,
        })
}

/// Reads lease records from each authoritative server directly (UDP, no
/// recursion, no cache) and reports the majority.
#[derive(Clone)]
pub struct DnsReader {
    zone: Zone,
    servers: Vec<(SocketAddr, TokioResolver)>,
    timeout: Duration,
}

impl DnsReader {
    /// `servers` are the authoritative servers for `zone`; `timeout` bounds
    /// each query (one attempt per server and read).
    pub fn new(servers: &[SocketAddr], zone: &str, timeout: Duration) -> Result<Self, DnsError> {
        if servers.is_empty() {
            return Err(DnsError::NoServers);
        }
        let zone = Zone::new(zone)?;
        let servers = servers
            .iter()
            .map(|addr| Ok((*addr, resolver_for(*addr, timeout)?)))
            .collect::<Result<_, DnsError>>()?;
        Ok(DnsReader {
            zone,
            servers,
            timeout,
        })
    }

    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    /// Asks every server at once and reports their answers and majority.
    pub async fn read(&self, lease: &LeaseName) -> DnsReport {
        let record = self.zone.record_name(lease);
        // `from_ascii`, not `from_str`: IDNA processing refuses the `_` our
        // escapes use, which DNS itself allows.
        let qname = match Name::from_ascii(&record) {
            Ok(n) => n,
            Err(e) => {
                let answers: Vec<(SocketAddr, ServerAnswer)> = self
                    .servers
                    .iter()
                    .map(|(a, _)| {
                        (
                            *a,
                            ServerAnswer::Unreachable(format!("record name {record}: {e}")),
                        )
                    })
                    .collect();
                return DnsReport {
                    answers,
                    majority: None,
                };
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (addr, resolver)) in self.servers.iter().enumerate() {
            let resolver = resolver.clone();
            let record = qname.clone();
            let timeout = self.timeout;
            let addr = *addr;
            tasks.spawn(async move { (i, ask(&resolver, addr, &record, timeout).await) });
        }
        let mut answers: Vec<(SocketAddr, ServerAnswer)> = self
            .servers
            .iter()
            .map(|(a, _)| (*a, ServerAnswer::Unreachable("query task failed".into())))
            .collect();
        while let Some(done) = tasks.join_next().await {
            if let Ok((i, answer)) = done {
                if let Some(slot) = answers.get_mut(i) {
                    slot.1 = answer;
                }
            }
        }
        for (addr, answer) in &answers {
            if let ServerAnswer::Invalid(why) = answer {
                tracing::warn!(server = %addr, lease = %lease, record = %record, reason = %why, "invalid lease record in DNS; not counted");
            }
        }
        let plain: Vec<ServerAnswer> = answers.iter().map(|(_, a)| a.clone()).collect();
        DnsReport {
            majority: majority(&plain),
            answers,
        }
    }
}

fn resolver_for(addr: SocketAddr, timeout: Duration) -> Result<TokioResolver, DnsError> {
    let mut conn = ConnectionConfig::udp();
    conn.port = addr.port();
    let ns = NameServerConfig::new(addr.ip(), true, vec![conn]);
    let config = ResolverConfig::from_parts(None, vec![], vec![ns]);
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.attempts = 1;
    opts.cache_size = 0;
    opts.positive_max_ttl = Some(Duration::ZERO);
    opts.negative_max_ttl = Some(Duration::ZERO);
    opts.recursion_desired = false;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ndots = 0;
    opts.num_concurrent_reqs = 1;
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| DnsError::Resolver(format!("{addr}: {e}")))
}

async fn ask(
    resolver: &TokioResolver,
    addr: SocketAddr,
    record: &Name,
    timeout: Duration,
) -> ServerAnswer {
    let lookup = tokio::time::timeout(
        timeout * 2,
        resolver.lookup(record.clone(), RecordType::TXT),
    )
    .await;
    let lookup = match lookup {
        Err(_) => return ServerAnswer::Unreachable(format!("{addr}: timed out")),
        Ok(Err(e)) if e.is_no_records_found() => return ServerAnswer::Absent,
        Ok(Err(e)) => return ServerAnswer::Unreachable(format!("{addr}: {e}")),
        Ok(Ok(l)) => l,
    };
    let txts: Vec<Vec<u8>> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(txt) => Some(
                txt.txt_data
                    .iter()
                    .flat_map(|s| s.iter().copied())
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    match txts.as_slice() {
        [] => ServerAnswer::Absent,
        [one] => match Published::parse_txt(one) {
            Ok(p) => ServerAnswer::Published(p),
            Err(e) => ServerAnswer::Invalid(e.to_string()),
        },
        more => ServerAnswer::Invalid(format!("{} TXT records; expected one", more.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(s: &str) -> LeaseName {
        LeaseName::new(s).expect("valid lease name")
    }

    #[test]
    fn maps_lease_names_to_readable_record_names() {
        let zone = Zone::new("Leases.Example.org.").expect("zone");
        let cases = [
            ("continuum/db/app", "app.db.continuum.leases.example.org."),
            ("db", "db.leases.example.org."),
            (
                "continuum/db.main/x_y",
                "x__y.db_dmain.continuum.leases.example.org.",
            ),
            ("a//b", "b._e.a.leases.example.org."),
            ("a_d", "a__d.leases.example.org."),
            ("a.d", "a_dd.leases.example.org."),
            ("eu-1/x", "x.eu-1.leases.example.org."),
        ];
        for (name, record) in cases {
            assert_eq!(zone.record_name(&lease(name)), record, "{name}");
            assert_eq!(zone.lease_name(record).as_deref(), Some(name), "{record}");
        }
    }

    #[test]
    fn long_names_get_a_hashed_label_that_fits() {
        let zone = Zone::new(&format!("{}.example.org", "z".repeat(60))).expect("zone");
        let long_label = format!("continuum/{}", "a".repeat(64));
        let many_labels = ["ab"; 66].join("/");
        let mut seen = std::collections::HashSet::new();
        for name in [long_label.as_str(), many_labels.as_str()] {
            let record = zone.record_name(&lease(name));
            assert!(record.starts_with("_h"), "{record}");
            assert_eq!(record.len(), 2 + 32 + 1 + zone.fqdn().len(), "{record}");
            assert_eq!(zone.lease_name(&record), None);
            assert!(seen.insert(record));
        }
        // Exactly 63 bytes stays readable.
        let at_limit = format!("x/{}", "a".repeat(63));
        assert!(!zone.record_name(&lease(&at_limit)).starts_with("_h"));
    }

    #[test]
    fn refuses_bad_zones() {
        for zone in [
            "",
            ".",
            "a..b",
            "ex ample.org",
            &"a".repeat(64),
            &"ab.".repeat(70),
        ] {
            assert_eq!(
                Zone::new(zone).map_err(|e| e.label()),
                Err("invalid_zone"),
                "{zone:?}"
            );
        }
    }

    #[test]
    fn txt_round_trips_and_free_has_an_empty_holder() {
        let held = Published {
            holder: Some(HolderId::new("eu-1").expect("holder")),
            epoch: Epoch(7),
        };
        assert_eq!(held.to_txt(), "holder=eu-1 epoch=7");
        let free = Published {
            holder: None,
            epoch: Epoch(7),
        };
        assert_eq!(free.to_txt(), "holder= epoch=7");
        for p in [held, free] {
            assert_eq!(Published::parse_txt(p.to_txt().as_bytes()), Ok(p));
        }
    }

    #[test]
    fn refuses_malformed_txt() {
        let cases: &[&[u8]] = &[
            b"",
            b"holder=eu-1",
            b"epoch=7",
            b"holder=eu-1 epoch=",
            b"holder=eu-1 epoch=-7",
            b"holder=eu-1 epoch=+7",
            b"holder=eu-1 epoch=7x",
            b"holder=eu-1 epoch=99999999999999999999",
            b"holder=eu-1 epoch=0",
            b"holder=EU epoch=7",
            b"holder=eu_1 epoch=7",
            b"holder=eu-1  epoch=7",
            b"holder=eu-1 epoch=7 ",
            b"holder=eu-1 epoch=7 epoch=8",
            b"holder=eu-1 holder=eu-2 epoch=7",
            b"holder=eu-1 epoch=7 extra=1",
            b"epoch=7 holder=eu-1",
            b"holder=eu-1 epoch=07",
            b"v=spf1 -all",
            b"\xff\xfe",
        ];
        for txt in cases {
            let got = Published::parse_txt(txt);
            assert_eq!(
                got.as_ref().map_err(|e| e.label()),
                Err("invalid_txt"),
                "{:?} -> {got:?}",
                String::from_utf8_lossy(txt)
            );
        }
        assert!(Published::parse_txt(&[b'a'; 256]).is_err());
    }

    fn p(holder: Option<&str>, epoch: u64) -> ServerAnswer {
        ServerAnswer::Published(Published {
            holder: holder.map(|h| HolderId::new(h).expect("holder")),
            epoch: Epoch(epoch),
        })
    }

    #[test]
    fn majority_counts_every_configured_server() {
        let down = || ServerAnswer::Unreachable("down".into());
        let bad = || ServerAnswer::Invalid("bad".into());
        // (answers, expected (holder, epoch, agreeing)).
        type Want<'a> = Option<(Option<&'a str>, u64, usize)>;
        let cases: Vec<(Vec<ServerAnswer>, Want)> = vec![
            (vec![p(Some("a"), 1)], Some((Some("a"), 1, 1))),
            (vec![p(Some("a"), 2); 3], Some((Some("a"), 2, 3))),
            (
                vec![p(Some("a"), 2), p(Some("a"), 2), down()],
                Some((Some("a"), 2, 2)),
            ),
            (
                vec![p(Some("a"), 2), p(Some("a"), 2), p(Some("b"), 3)],
                Some((Some("a"), 2, 2)),
            ),
            (
                vec![p(Some("a"), 2), p(Some("b"), 3), p(Some("a"), 1)],
                None,
            ),
            (vec![p(Some("a"), 2), down(), down()], None),
            (vec![p(Some("a"), 2), bad(), bad()], None),
            (vec![p(Some("a"), 2), p(Some("a"), 2), bad(), bad()], None),
            (
                vec![p(None, 4), p(None, 4), ServerAnswer::Absent],
                Some((None, 4, 2)),
            ),
            (vec![ServerAnswer::Absent; 3], None),
            (vec![], None),
        ];
        for (answers, want) in cases {
            let got = majority(&answers).map(|v| {
                assert_eq!(v.total, answers.len());
                (v.holder.map(|h| h.to_string()), v.epoch.0, v.agreeing)
            });
            let want = want.map(|(h, e, n)| (h.map(str::to_string), e, n));
            assert_eq!(got, want, "{answers:?}");
        }
    }

    #[test]
    fn reader_needs_servers_and_a_zone() {
        assert_eq!(
            DnsReader::new(&[], "example.org", Duration::from_secs(1)).err(),
            Some(DnsError::NoServers)
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_txt_never_panics(txt in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = Published::parse_txt(&txt);
        }

        #[test]
        fn parse_txt_never_panics_on_near_misses(txt in "(holder|epoch|x)?=?[a-z0-9 =_-]{0,40}") {
            if let Ok(p) = Published::parse_txt(txt.as_bytes()) {
                // Anything accepted is canonical.
                proptest::prop_assert_eq!(p.to_txt(), txt);
            }
        }

        #[test]
        fn record_names_are_injective_and_valid(name in "[a-z0-9]([a-z0-9./_-]{0,198}[a-z0-9])?") {
            let zone = Zone::new("zone.example").expect("zone");
            let lease = lease(&name);
            let record = zone.record_name(&lease);
            proptest::prop_assert!(record.len() <= MAX_DNS_NAME + 1);
            for label in record.trim_end_matches('.').split('.') {
                proptest::prop_assert!(!label.is_empty() && label.len() <= MAX_LABEL, "{}", record);
            }
            if !record.starts_with("_h") {
                proptest::prop_assert_eq!(zone.lease_name(&record), Some(name));
            }
        }
    }
}
