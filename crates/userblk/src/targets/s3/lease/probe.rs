//! Whether a server makes the conditional writes the lease relies on
//! atomic.
//!
//! Nothing in the S3 API says so, and a server that checks a condition and
//! then writes (s3s-fs) answers every single request correctly: only
//! requests that overlap show the difference. So the probe makes them
//! overlap, on a fresh key `.lease-probe-<random>` under the volume's
//! prefix, deleted afterwards:
//! 1. [`RACERS`] creates with `If-None-Match: *` at once: exactly one may
//!    succeed;
//! 2. one more create of the now existing key: must be refused (else the
//!    server ignores the header);
//! 3. an overwrite with `If-Match` and a wrong ETag: must be refused;
//! 4. an overwrite with `If-Match` and the object's ETag: must succeed,
//!    quoted as RFC 9110 writes it, or bare (RADOS Gateway 16.2 compares
//!    the bare value);
//! 5. [`RACERS`] such overwrites with that ETag at once: exactly one may
//!    succeed;
//!
//! then steps 1 and 5 again on new keys, [`ROUNDS`] in all.
//!
//! A server that is not atomic can still let exactly one of the racers in
//! by chance, so the races run [`ROUNDS`] times; the probe is evidence,
//! not proof.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::targets::s3::layout::VolumeId;
use crate::targets::s3::{S3Store, StoreError};

/// Conditional writes sent at once in each race.
pub const RACERS: usize = 8;
/// Rounds of both races, each on a fresh key: a server that is not atomic
/// lets exactly one racer in by chance now and then (s3s-fs did in one
/// probe of eight, two daemons probing at once on a loaded machine), all
/// rounds far more rarely.
pub const ROUNDS: usize = 3;

/// How the server wants the ETag of an `If-Match`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtagForm {
    /// `"abc"`, as sent in the `ETag` header (AWS, the HTTP standard).
    Quoted,
    /// `abc` (RADOS Gateway 16.2).
    Bare,
}

impl EtagForm {
    /// `etag` (quoted or not) in this form.
    #[must_use]
    pub fn apply(self, etag: &str) -> String {
        let bare = etag.trim_matches('"');
        match self {
            Self::Quoted => format!("\"{bare}\""),
            Self::Bare => bare.to_owned(),
        }
    }
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Both conditional writes are atomic; `If-Match` takes this form.
    Atomic(EtagForm),
    /// Not atomic or not supported: why, as the end of a sentence that
    /// starts with the server's name.
    Not(String),
}

/// The probe's verdict and what it cost.
#[derive(Debug, Clone)]
pub struct Probe {
    /// What the server does.
    pub verdict: Verdict,
    /// How long the probe took.
    pub took: Duration,
}

/// Probe the server of `store` (see the module docs).
///
/// # Errors
/// A request failed for another reason than its condition.
pub fn run(store: &S3Store) -> Result<Probe, StoreError> {
    let start = Instant::now();
    let id = VolumeId::random().map_err(|e| StoreError::Config(format!("random key: {e}")))?;
    let key = format!(".lease-probe-{id}");
    let mut verdict = steps(store, &key);
    remove(store, &key);
    for round in 1..ROUNDS {
        let Ok(Verdict::Atomic(form)) = verdict else {
            break;
        };
        let key = format!("{key}-{round}");
        verdict = races(store, &key, form);
        remove(store, &key);
    }
    Ok(Probe {
        verdict: verdict?,
        took: start.elapsed(),
    })
}

/// Removes a probe object, whatever the steps left (a failed step may have
/// left it).
fn remove(store: &S3Store, key: &str) {
    if let Err(e) = store.delete(key) {
        tracing::warn!("s3: removing the lease probe's object {key}: {e}");
    }
}

/// Steps 1 and 5 again on a fresh key (rounds after the first).
fn races(store: &S3Store, key: &str, form: EtagForm) -> Result<Verdict, StoreError> {
    let won = store.race_creates(key, RACERS)?;
    if won != 1 {
        return Ok(Verdict::Not(not_atomic(
            "creates",
            "creates of one new key",
            won,
        )));
    }
    let Some((_, etag)) = store.get_with_etag(key)? else {
        return Ok(Verdict::Not(
            "lost the probe's object just after creating it".into(),
        ));
    };
    let won = store.race_if_match(key, &form.apply(&etag), RACERS)?;
    if won != 1 {
        return Ok(Verdict::Not(not_atomic(
            "overwrites",
            "If-Match overwrites of one object",
            won,
        )));
    }
    Ok(Verdict::Atomic(form))
}

fn not_atomic(what: &str, racers: &str, won: usize) -> String {
    format!(
        "does not make conditional {what} atomic ({won} of {RACERS} {racers} sent at once \
         succeeded)"
    )
}

fn steps(store: &S3Store, key: &str) -> Result<Verdict, StoreError> {
    let not = |s: String| Ok(Verdict::Not(s));
    let won = store.race_creates(key, RACERS)?;
    if won != 1 {
        return not(not_atomic("creates", "creates of one new key", won));
    }
    if store.put_if_absent(key, Bytes::from_static(b"late"))? {
        return not("ignores If-None-Match (a create of an existing key succeeded)".into());
    }
    let Some((_, etag)) = store.get_with_etag(key)? else {
        return not("lost the probe's object just after creating it".into());
    };
    let wrong = "\"00000000000000000000000000000000\"";
    if store
        .put_if_match(key, Bytes::from_static(b"wrong"), wrong)?
        .is_some()
    {
        return not("ignores If-Match (an overwrite with a wrong ETag succeeded)".into());
    }
    let mut current = None;
    for form in [EtagForm::Quoted, EtagForm::Bare] {
        let body = Bytes::from_static(b"matched");
        if let Some(new) = store.put_if_match(key, body, &form.apply(&etag))? {
            current = Some((form, new));
            break;
        }
    }
    let Some((form, etag)) = current else {
        return not("refuses If-Match with the object's own ETag".into());
    };
    let won = store.race_if_match(key, &form.apply(&etag), RACERS)?;
    if won != 1 {
        return not(not_atomic(
            "overwrites",
            "If-Match overwrites of one object",
            won,
        ));
    }
    Ok(Verdict::Atomic(form))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_forms() {
        assert_eq!(EtagForm::Quoted.apply("\"ab\""), "\"ab\"");
        assert_eq!(EtagForm::Quoted.apply("ab"), "\"ab\"");
        assert_eq!(EtagForm::Bare.apply("\"ab\""), "ab");
        assert_eq!(EtagForm::Bare.apply("ab"), "ab");
    }
}
