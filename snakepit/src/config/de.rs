//! The human forms a configuration accepts: sizes (`"512MiB"` or a number of bytes), command
//! lines (a string split with shell word rules, or an array), lists of URLs (an array, or a
//! string split at commas), and the names of the library's enums (`"kill"`, `"strict"`,
//! `"snakepit-v0"`). Durations use `humantime-serde` directly.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::{Affinity, DropPolicy};
use snakepit_core::Protocol;

/// A byte size: an integer number of bytes, or a string like `"512MiB"`, `"64KiB"`, `"1.5GB"`.
struct ByteCount;

impl Visitor<'_> for ByteCount {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number of bytes or a size like \"512MiB\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        v.trim().parse::<bytesize::ByteSize>().map(|b| b.as_u64()).map_err(|e| {
            E::custom(format!("invalid size {v:?} (a number of bytes, or like \"64KiB\", \"512MiB\"): {e}"))
        })
    }
}

fn to_usize<E: de::Error>(v: u64) -> Result<usize, E> {
    usize::try_from(v).map_err(|_| E::custom(format!("{v} bytes is too large for this platform")))
}

/// A byte size as `usize`.
pub(crate) fn bytes_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    d.deserialize_any(ByteCount).and_then(to_usize)
}

/// An optional byte size (absent: none).
pub(crate) fn opt_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(ByteCount).map(Some)
}

/// A command line: a string split with POSIX shell word rules (the `shlex` crate: quotes and
/// backslashes, no variables or globbing), or an array of strings.
struct CommandLine;

impl<'de> Visitor<'de> for CommandLine {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a command line (\"perl worker.pl\") or an array of strings")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
        split_command(v).map_err(E::custom)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut words = Vec::new();
        while let Some(w) = seq.next_element::<String>()? {
            words.push(w);
        }
        Ok(words)
    }
}

/// Splits a command line with POSIX shell word rules (quotes and backslashes; no variables,
/// no globbing), as `[worker] command` and `snakepit serve --command` are: `"perl -e 'print 1'"`
/// is `["perl", "-e", "print 1"]`. An `Err` names the line (unbalanced quotes).
pub fn split_command(line: &str) -> Result<Vec<String>, String> {
    shlex::split(line).ok_or_else(|| format!("{line:?}: unbalanced quotes"))
}

/// `[worker] command`.
pub(crate) fn command<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    d.deserialize_any(CommandLine).map(Some)
}

/// A list of URLs: an array of strings, or one string split at commas (what a variable holds:
/// `https://a:7443,https://b:7443`), blanks around each trimmed and empty ones dropped.
struct UrlList;

impl<'de> Visitor<'de> for UrlList {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of URLs, or a string of URLs separated by commas")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
        Ok(v.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut urls = Vec::new();
        while let Some(u) = seq.next_element::<String>()? {
            urls.push(u);
        }
        Ok(urls)
    }
}

/// `remote.agents`.
pub(crate) fn url_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    d.deserialize_any(UrlList)
}

/// A string naming one of `names`, as its index.
fn one_of<'de, D: Deserializer<'de>>(d: D, names: &'static [&'static str]) -> Result<usize, D::Error> {
    let s = String::deserialize(d)?;
    names.iter().position(|n| *n == s).ok_or_else(|| de::Error::unknown_variant(&s, names))
}

/// `drop_policy`: `"kill"` or `"detach"`.
pub(crate) fn drop_policy<'de, D: Deserializer<'de>>(d: D) -> Result<DropPolicy, D::Error> {
    Ok(match one_of(d, DROP_POLICIES)? {
        0 => DropPolicy::Kill,
        _ => DropPolicy::Detach,
    })
}

/// The names of [`DropPolicy`]'s variants.
pub(crate) const DROP_POLICIES: &[&str] = &["kill", "detach"];

/// `sessions.affinity`: `"hint"`, `"strict"` or `"strict_fail_fast"`.
pub(crate) fn affinity<'de, D: Deserializer<'de>>(d: D) -> Result<Affinity, D::Error> {
    Ok(match one_of(d, AFFINITIES)? {
        0 => Affinity::Hint,
        1 => Affinity::Strict,
        _ => Affinity::StrictFailFast,
    })
}

/// The names of [`Affinity`]'s variants.
pub(crate) const AFFINITIES: &[&str] = &["hint", "strict", "strict_fail_fast"];

/// `worker.protocol`: `"v1"` or `"snakepit-v0"`.
pub(crate) fn protocol<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
    Ok(match one_of(d, PROTOCOLS)? {
        0 => Protocol::V1,
        _ => Protocol::SnakepitV0,
    })
}

/// The names of [`Protocol`]'s variants.
pub(crate) const PROTOCOLS: &[&str] = &["v1", "snakepit-v0"];

/// `worker.timeouts`: command name → duration.
pub(crate) fn duration_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Duration>, D::Error> {
    let m = BTreeMap::<String, humantime_serde::Serde<Duration>>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k, v.into_inner())).collect())
}
