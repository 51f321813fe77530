//! Filters: targets that wrap a target, to change what it advertises or
//! how its requests go (delays, errors, limits) or to watch them (log, stats).
//!
//! A filter implements [`Filter`]: it holds its inner target in a [`Base`]
//! and overrides only what it changes, everything else passing through;
//! every filter is thereby a [`Target`](crate::Target), and a stack is
//! nesting. [`build`] makes a stack from specs (`NAME[:key=value,...]`,
//! [`Spec`]), the first spec nearest the frontend. Every filter passes
//! requests down and results up through the ordinary `submit`/`complete`
//! calls; the shared rules (step numbers, per-request marks) are in [`Base`].
//!
//! - [`readonly`]: a read-only device.
//! - [`offset`], [`truncate`]: a byte range of the target, or another size.
//! - [`delay`], [`rate`]: hold requests back on the ring's timers.
//! - [`error`]: fail chosen requests.
//! - [`log`], [`stats`]: record requests and their results.
//! - [`cow`]: a writable copy-on-write overlay over any target.
//! - [`cache`]: a read (or write-back) cache for slow targets.
//! - [`flakey`]: a volatile write cache that loses unflushed writes on a power cut.

mod base;
pub mod cache;
pub mod cow;
pub mod delay;
pub mod error;
mod filter;
pub mod flakey;
pub mod log;
pub mod offset;
pub mod rate;
pub mod readonly;
mod rng;
mod side;
pub mod spec;
mod stack;
pub mod stats;
pub mod table;
pub mod truncate;

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use crate::target::{Op, MAX_FILTER_LAYERS};

pub use base::{clip_extents, described_filters, Base, DataUse};
pub use filter::Filter;
pub use spec::{Options, Spec};
pub use stack::{build, check, Config, Env};
pub use table::{help, short_help, FILTERS};

/// Why a filter spec or a stack could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The spec is not `NAME[:key=value,...]`.
    #[error("filter '{spec}': {msg}")]
    Syntax {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        msg: String,
    },
    /// No filter has that name.
    #[error("unknown filter '{name}' (known: {})", table::names())]
    UnknownFilter {
        /// The name given.
        name: String,
    },
    /// The filter has no such option.
    #[error("filter {filter}: unknown option '{key}' (known: {known})")]
    UnknownKey {
        /// The filter.
        filter: &'static str,
        /// The option given.
        key: String,
        /// The options it knows.
        known: String,
    },
    /// An option's value does not parse.
    #[error("filter {filter}: {key}={value}: {msg}")]
    BadValue {
        /// The filter.
        filter: &'static str,
        /// The option.
        key: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        msg: String,
    },
    /// The options do not fit together or do not fit the target beneath.
    #[error("filter {filter}: {msg}")]
    Invalid {
        /// The filter.
        filter: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A file or socket the filter needs could not be opened.
    #[error("filter {filter}: {what}: {err}")]
    Io {
        /// The filter.
        filter: &'static str,
        /// What was being done.
        what: String,
        /// What the OS said.
        err: std::io::Error,
    },
    /// More filters than the step space has room for.
    #[error("too many filters in one stack (at most {MAX_FILTER_LAYERS})")]
    TooDeep,
}

impl FilterError {
    /// For `map_err`: `filter` failed at `what` with an OS error (a
    /// `std::io::Error` or an `Errno`).
    pub(crate) fn io<E: Into<std::io::Error>>(
        filter: &'static str,
        what: impl Into<String>,
    ) -> impl FnOnce(E) -> FilterError {
        let what = what.into();
        move |err| FilterError::Io {
            filter,
            what,
            err: err.into(),
        }
    }
}

/// `path` made absolute from the current directory now (a filter's files
/// must not move when the daemon changes directory); `what` names it in
/// the error.
pub(crate) fn absolute(
    filter: &'static str,
    path: &std::path::Path,
    what: impl Into<String>,
) -> Result<std::path::PathBuf, FilterError> {
    std::path::absolute(path).map_err(FilterError::io(filter, what))
}

impl From<FilterError> for crate::Error {
    fn from(e: FilterError) -> Self {
        match e {
            FilterError::Io { filter, what, err } => {
                crate::Error::io(format!("filter {filter}: {what}"), err)
            }
            other => crate::Error::invalid(other.to_string()),
        }
    }
}

/// Option names of the ops, in [`op_index`] order.
pub(crate) const OP_KEYS: [&str; 5] = ["read", "write", "flush", "discard", "write_zeroes"];

/// An op's place in per-op tables.
pub(crate) const fn op_index(op: Op) -> usize {
    op.index()
}

/// The ops, in [`op_index`] order.
pub(crate) const OPS: [Op; 5] = [Op::Read, Op::Write, Op::Flush, Op::Discard, Op::WriteZeroes];

/// The name of `op`, as options and logs spell it.
pub(crate) const fn op_name(op: Op) -> &'static str {
    OP_KEYS[op_index(op)]
}
