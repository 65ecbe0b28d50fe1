//! The lease protocol between lease holders (agents) and witnesses.
//!
//! One JSON message per request and per response, the same on every transport
//! (HTTPS today, UDP inside the WireGuard link later). Requests are validated
//! here, once, by [`Request::decode`]: a witness never sees a name, holder or
//! TTL outside the bounds below.
//!
//! Epochs are fencing tokens: a witness grants an epoch only if it is strictly
//! greater than every epoch it has granted for that lease before (DESIGN.md,
//! invariant 1). The proposer picks the epoch (max seen + 1), so that the same
//! epoch can be granted by a majority of independent witnesses.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest request body a witness accepts, in bytes.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Longest lease name (a DNS name fits: `continuum/<namespace>/<name>`).
pub const MAX_NAME_LEN: usize = 200;
/// Longest holder id (a region name).
pub const MAX_HOLDER_LEN: usize = 63;
/// Shortest TTL a witness grants: below this, renewals cannot keep up.
pub const MIN_TTL: Duration = Duration::from_millis(200);
/// Longest TTL a witness grants: a dead holder blocks failover this long.
pub const MAX_TTL: Duration = Duration::from_secs(600);

/// Why a request was refused before reaching the lease logic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("request body is {0} bytes; the limit is {MAX_REQUEST_BYTES}")]
    TooLarge(usize),
    #[error("request body is not a valid lease request: {0}")]
    Malformed(String),
    #[error("invalid field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl DecodeError {
    /// Stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DecodeError::TooLarge(_) => "too_large",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Invalid { .. } => "invalid",
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// A lease name such as `continuum/db/app`: 1..=200 of `[a-z0-9._/-]`,
/// starting and ending with an alphanumeric character.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LeaseName(String);

/// The id of a lease holder (a region): 1..=63 of `[a-z0-9-]`, like a DNS label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HolderId(String);

fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_NAME_LEN {
        return Err(format!("{} characters; at most {MAX_NAME_LEN}", s.len()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '/' | '-'))
    {
        return Err(format!("character {c:?} not allowed; use [a-z0-9._/-]"));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(s.chars().next()) || !alnum(s.chars().last()) {
        return Err("must start and end with [a-z0-9]".into());
    }
    Ok(())
}

fn check_holder(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_HOLDER_LEN {
        return Err(format!("{} characters; at most {MAX_HOLDER_LEN}", s.len()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
    {
        return Err(format!("character {c:?} not allowed; use [a-z0-9-]"));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with [a-z0-9]".into());
    }
    Ok(())
}

impl LeaseName {
    pub fn new(s: impl Into<String>) -> Result<Self, DecodeError> {
        let s = s.into();
        check_name(&s).map_err(|r| invalid("name", r))?;
        Ok(Self(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl HolderId {
    pub fn new(s: impl Into<String>) -> Result<Self, DecodeError> {
        let s = s.into();
        check_holder(&s).map_err(|r| invalid("holder", r))?;
        Ok(Self(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype {
    ($t:ty, $check:ident, $field:literal) => {
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                $check(&s).map_err(|r| format!("invalid {}: {r}", $field))?;
                Ok(Self(s))
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_newtype!(LeaseName, check_name, "name");
string_newtype!(HolderId, check_holder, "holder");

/// A fencing token. Zero means "never granted".
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the primary records with its grant so that a standby can decide
/// whether it may promote (DESIGN.md invariant 3).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseMeta {
    /// The holder id of the standby guaranteed synchronous. `None` means no
    /// standby is known to be synchronous: automatic promotion is forbidden.
    #[serde(default)]
    pub sync_standby: Option<HolderId>,
    /// Last WAL position the primary confirmed flushed on the sync standby.
    #[serde(default)]
    pub confirmed_lsn: Option<u64>,
    /// Orders updates within one epoch; a witness keeps the highest.
    #[serde(default)]
    pub seq: u64,
    /// A planned handover in progress (`continuum-agent switchover`): the
    /// holder that wrote this record is handing the lease to `to`. While it
    /// is the newest record at the highest granted epoch, only `to` may take
    /// the lease (see `failover::decide`). Absent on the wire when `None`,
    /// so records without a handover keep their old encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<Handover>,
    /// Random id of the agent runner that wrote this record, so that a fence
    /// guard can tell a successor's record from its own. Absent when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<u64>,
    /// The `writer` of the record this writer's grant was adopted over (an
    /// agent restart or a leader change). A successor names its predecessor
    /// here, which no record written before the adoption can: the
    /// predecessor's fence guard stands down only for such a record
    /// (`lease_guard::successor_verdict`). Absent when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_from: Option<u64>,
}

impl LeaseMeta {
    /// A fresh writer id for one runner (random per process and call).
    pub fn new_writer_id() -> u64 {
        use std::hash::BuildHasher;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::collections::hash_map::RandomState::new().hash_one((std::process::id(), nanos))
    }

    /// The `seq` of the next update in an epoch. A witness silently keeps
    /// the highest `(epoch, seq)`, and a process that adopts its region's
    /// grant after a restart or leader change continues an epoch an earlier
    /// process wrote in: counting from 1 again would make every one of its
    /// updates, "no synchronous standby" included, lose to the stale record
    /// (invariant 3). So `seq` is at least the wall clock in milliseconds
    /// (a later process starts above an earlier one), above the highest
    /// `seq` seen at the witnesses for the epoch, and above the previous.
    pub fn next_seq(prev: u64, seen: Option<u64>) -> u64 {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self::next_seq_at(prev, seen, now_ms)
    }

    /// [`LeaseMeta::next_seq`] at a given wall-clock time.
    pub fn next_seq_at(prev: u64, seen: Option<u64>, now_ms: u64) -> u64 {
        prev.saturating_add(1)
            .max(seen.map_or(0, |s| s.saturating_add(1)))
            .max(now_ms)
    }
}

/// A planned handover of the lease to a named successor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    /// The only holder that may take the lease next.
    pub to: HolderId,
    /// The old primary's last WAL record (its shutdown checkpoint), once its
    /// database has stopped cleanly. The successor takes the lease only after
    /// replaying past it, so it holds every byte of the old primary's WAL
    /// and the old primary can follow it without a rebuild. `None` while the
    /// old primary is still stopping.
    #[serde(default)]
    pub final_lsn: Option<u64>,
    /// CloudNativePG: the demoted old primary's `status.demotionToken`, for
    /// the successor's `spec.replica.promotionToken` (CNPG itself checks the
    /// successor replayed up to it before promoting). Absent when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion_token: Option<String>,
}

/// Longest promotion token a witness stores (CNPG's are a few hundred bytes).
pub const MAX_PROMOTION_TOKEN_LEN: usize = 4096;

/// A lease request. The externally tagged JSON form is the wire format:
/// `{"acquire": {"name": "...", "holder": "...", "epoch": 3, "ttl_ms": 5000}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Take the lease at `epoch` (proposed by the caller; must exceed every
    /// epoch this witness has granted for the lease), or re-confirm it if the
    /// caller already holds exactly that epoch.
    Acquire(Acquire),
    /// Extend a lease the caller holds at `epoch`.
    Renew(Acquire),
    /// Give the lease up; the epoch stays recorded.
    Release(Release),
    /// Read the lease as this witness sees it.
    Read(Read),
    /// Replace the metadata record; only the current holder at its epoch.
    UpdateMeta(UpdateMeta),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acquire {
    pub name: LeaseName,
    pub holder: HolderId,
    pub epoch: Epoch,
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub name: LeaseName,
    pub holder: HolderId,
    pub epoch: Epoch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Read {
    pub name: LeaseName,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateMeta {
    pub name: LeaseName,
    pub holder: HolderId,
    pub epoch: Epoch,
    pub meta: LeaseMeta,
}

impl Acquire {
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }
}

impl Request {
    /// Decode and validate one request body. Every witness transport calls
    /// this; nothing else parses requests.
    pub fn decode(body: &[u8]) -> Result<Request, DecodeError> {
        if body.len() > MAX_REQUEST_BYTES {
            return Err(DecodeError::TooLarge(body.len()));
        }
        let req: Request =
            serde_json::from_slice(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        req.validate()?;
        Ok(req)
    }

    /// Checks the bounds serde cannot express.
    pub fn validate(&self) -> Result<(), DecodeError> {
        match self {
            Request::Acquire(a) | Request::Renew(a) => {
                let ttl = a.ttl();
                if ttl < MIN_TTL || ttl > MAX_TTL {
                    return Err(invalid(
                        "ttl_ms",
                        format!(
                            "{} is out of range {}..={}",
                            a.ttl_ms,
                            MIN_TTL.as_millis(),
                            MAX_TTL.as_millis()
                        ),
                    ));
                }
                if a.epoch == Epoch(0) {
                    return Err(invalid("epoch", "must be at least 1"));
                }
            }
            Request::Release(r) => {
                if r.epoch == Epoch(0) {
                    return Err(invalid("epoch", "must be at least 1"));
                }
            }
            Request::Read(_) => {}
            Request::UpdateMeta(u) => {
                if u.epoch == Epoch(0) {
                    return Err(invalid("epoch", "must be at least 1"));
                }
                if let Some(h) = &u.meta.handover {
                    if h.to == u.holder {
                        return Err(invalid(
                            "handover",
                            "a holder cannot hand the lease over to itself",
                        ));
                    }
                    if let Some(t) = &h.promotion_token {
                        let ok = t.len() <= MAX_PROMOTION_TOKEN_LEN
                            && !t.is_empty()
                            && t.chars().all(|c| {
                                c.is_ascii_alphanumeric()
                                    || matches!(c, '+' | '/' | '=' | '-' | '_')
                            });
                        if !ok {
                            return Err(invalid(
                                "promotion_token",
                                format!(
                                    "1..={MAX_PROMOTION_TOKEN_LEN} characters of base64 expected"
                                ),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    pub fn name(&self) -> &LeaseName {
        match self {
            Request::Acquire(a) | Request::Renew(a) => &a.name,
            Request::Release(r) => &r.name,
            Request::Read(r) => &r.name,
            Request::UpdateMeta(u) => &u.name,
        }
    }

    /// Stable label for metrics and logs.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Acquire(_) => "acquire",
            Request::Renew(_) => "renew",
            Request::Release(_) => "release",
            Request::Read(_) => "read",
            Request::UpdateMeta(_) => "update_meta",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing these plain structs cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A lease as one witness sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseView {
    pub name: LeaseName,
    /// The live holder, if any (by this witness's clock).
    pub holder: Option<HolderId>,
    /// Epoch of the live holder, or of the last grant when free.
    pub epoch: Epoch,
    /// Highest epoch this witness ever granted for the lease.
    pub max_epoch: Epoch,
    /// Time left on the live grant, by this witness's clock.
    pub remaining_ms: Option<u64>,
    /// Last metadata written by a holder (kept across expiry).
    pub meta: Option<LeaseMeta>,
    /// Epoch of the holder that wrote `meta`.
    pub meta_epoch: Epoch,
}

/// A witness's answer. HTTP maps `Granted`/`Released`/`State`/`MetaStored`
/// to 200 and the refusals to 409.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// The caller holds the lease at `epoch` for `ttl_ms` from when the
    /// witness received the request.
    Granted {
        epoch: Epoch,
        ttl_ms: u64,
    },
    /// Someone else holds it.
    Held {
        holder: HolderId,
        epoch: Epoch,
        remaining_ms: u64,
    },
    /// The proposed epoch is not above the highest this witness granted.
    EpochTooLow {
        max_epoch: Epoch,
    },
    /// The caller is not the current holder at that epoch.
    NotHolder {
        holder: Option<HolderId>,
        epoch: Epoch,
    },
    Released,
    State(LeaseView),
    MetaStored,
    /// The request was refused before the lease logic (bad input, auth,
    /// store failure). `code` is a stable label.
    Error {
        code: String,
        message: String,
    },
}

impl Response {
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Response::Held { .. } | Response::EpochTooLow { .. } | Response::NotHolder { .. }
        )
    }

    pub fn decode(body: &[u8]) -> Result<Response, DecodeError> {
        if body.len() > 4 * MAX_REQUEST_BYTES {
            return Err(DecodeError::TooLarge(body.len()));
        }
        serde_json::from_slice(body).map_err(|e| DecodeError::Malformed(e.to_string()))
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_later_process_outranks_an_earlier_one_in_the_same_epoch() {
        // The earlier process wrote seq 57 at t = 1000 ms.
        let old = LeaseMeta::next_seq_at(56, None, 1000);
        assert_eq!(old, 1000);
        // Restarted (its counter back at 0) a little later.
        assert!(LeaseMeta::next_seq_at(0, None, 1500) > old);
        // Its clock behind the old one's: the seq seen at the witnesses wins.
        assert!(LeaseMeta::next_seq_at(0, Some(old), 900) > old);
        // Within one process: strictly increasing even if the clock stalls.
        let a = LeaseMeta::next_seq_at(0, None, 2000);
        let b = LeaseMeta::next_seq_at(a, None, 2000);
        assert!(b > a);
        assert_eq!(LeaseMeta::next_seq_at(u64::MAX, None, 0), u64::MAX);
    }

    use super::*;

    fn acquire_json(name: &str, holder: &str, epoch: u64, ttl: u64) -> String {
        format!(
            r#"{{"acquire":{{"name":"{name}","holder":"{holder}","epoch":{epoch},"ttl_ms":{ttl}}}}}"#
        )
    }

    #[test]
    fn decodes_a_valid_acquire() {
        let req = Request::decode(acquire_json("continuum/db/app", "eu-1", 3, 5000).as_bytes());
        let Ok(Request::Acquire(a)) = req else {
            panic!("expected acquire, got {req:?}");
        };
        assert_eq!(a.name.as_str(), "continuum/db/app");
        assert_eq!(a.holder.as_str(), "eu-1");
        assert_eq!(a.epoch, Epoch(3));
        assert_eq!(a.ttl(), Duration::from_secs(5));
    }

    #[test]
    fn refuses_bad_input_with_the_field_named() {
        let cases: &[(&str, &str)] = &[
            (&acquire_json("", "eu-1", 1, 5000), "name"),
            (&acquire_json(&"a".repeat(201), "eu-1", 1, 5000), "name"),
            (&acquire_json("Upper", "eu-1", 1, 5000), "name"),
            (&acquire_json("/lead", "eu-1", 1, 5000), "name"),
            (&acquire_json("db", "", 1, 5000), "holder"),
            (&acquire_json("db", "eu_1", 1, 5000), "holder"),
            (&acquire_json("db", &"h".repeat(64), 1, 5000), "holder"),
            (&acquire_json("db", "eu-1", 1, 0), "ttl_ms"),
            (&acquire_json("db", "eu-1", 1, 199), "ttl_ms"),
            (&acquire_json("db", "eu-1", 1, 600_001), "ttl_ms"),
            (&acquire_json("db", "eu-1", 0, 5000), "epoch"),
        ];
        for (body, field) in cases {
            let err = Request::decode(body.as_bytes()).expect_err(body);
            let msg = err.to_string();
            assert!(msg.contains(field), "{body}: {msg} should name {field}");
        }
    }

    #[test]
    fn refuses_negative_ttl_unknown_fields_and_garbage() {
        for body in [
            r#"{"acquire":{"name":"db","holder":"a","epoch":1,"ttl_ms":-5}}"#,
            r#"{"acquire":{"name":"db","holder":"a","epoch":1,"ttl_ms":5000,"x":1}}"#,
            r#"{"acquire":{"name":"db","holder":"a","epoch":1}}"#,
            r#"{"steal":{"name":"db"}}"#,
            r#"{"read":{"name":"db"},"renew":{"name":"db"}}"#,
            "",
            "null",
            "\u{0}\u{1}",
        ] {
            let err = Request::decode(body.as_bytes()).expect_err(body);
            assert_eq!(err.label(), "malformed", "{body}: {err}");
        }
    }

    #[test]
    fn handover_is_optional_on_the_wire_and_validated() {
        let plain = r#"{"update_meta":{"name":"db","holder":"a","epoch":2,"meta":{"sync_standby":"b","confirmed_lsn":7,"seq":1}}}"#;
        let Ok(Request::UpdateMeta(u)) = Request::decode(plain.as_bytes()) else {
            panic!("old encoding must still decode");
        };
        assert_eq!(u.meta.handover, None);
        // No handover: the encoding carries no new field (old witnesses accept it).
        assert!(!String::from_utf8(Request::UpdateMeta(u.clone()).encode())
            .unwrap()
            .contains("handover"));
        let with = r#"{"update_meta":{"name":"db","holder":"a","epoch":2,"meta":{"seq":2,"handover":{"to":"b","final_lsn":99}}}}"#;
        let Ok(Request::UpdateMeta(u)) = Request::decode(with.as_bytes()) else {
            panic!("handover must decode");
        };
        assert_eq!(
            u.meta.handover,
            Some(Handover {
                to: HolderId::new("b").unwrap(),
                final_lsn: Some(99),
                promotion_token: None,
            })
        );
        let to_self = r#"{"update_meta":{"name":"db","holder":"a","epoch":2,"meta":{"seq":2,"handover":{"to":"a"}}}}"#;
        let err = Request::decode(to_self.as_bytes()).expect_err("to itself");
        assert!(err.to_string().contains("handover"), "{err}");
        let token = r#"{"update_meta":{"name":"db","holder":"a","epoch":2,"meta":{"seq":3,"handover":{"to":"b","promotion_token":"eyJhIjoxfQ=="}}}}"#;
        let Ok(Request::UpdateMeta(u)) = Request::decode(token.as_bytes()) else {
            panic!("token must decode");
        };
        assert_eq!(
            u.meta.handover.and_then(|h| h.promotion_token).as_deref(),
            Some("eyJhIjoxfQ==")
        );
        let bad_token = r#"{"update_meta":{"name":"db","holder":"a","epoch":2,"meta":{"seq":3,"handover":{"to":"b","promotion_token":"a b"}}}}"#;
        let err = Request::decode(bad_token.as_bytes()).expect_err("bad token");
        assert!(err.to_string().contains("promotion_token"), "{err}");
        let bad = r#"{"update_meta":{"name":"db","holder":"a","epoch":2,"meta":{"seq":2,"handover":{"to":"B_1"}}}}"#;
        assert_eq!(
            Request::decode(bad.as_bytes()).unwrap_err().label(),
            "malformed"
        );
    }

    #[test]
    fn refuses_oversized_bodies_before_parsing() {
        let body = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert_eq!(
            Request::decode(&body),
            Err(DecodeError::TooLarge(MAX_REQUEST_BYTES + 1))
        );
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Request::decode(&body);
        }

        #[test]
        fn valid_requests_round_trip(epoch in 1u64.., ttl in 200u64..=600_000, name in "[a-z0-9]([a-z0-9./_-]{0,30}[a-z0-9])?", holder in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?") {
            let req = Request::Renew(Acquire {
                name: LeaseName::new(name).expect("generated valid"),
                holder: HolderId::new(holder).expect("generated valid"),
                epoch: Epoch(epoch),
                ttl_ms: ttl,
            });
            proptest::prop_assert_eq!(Request::decode(&req.encode()), Ok(req));
        }
    }
}
