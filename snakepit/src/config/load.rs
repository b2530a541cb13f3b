//! Reading a configuration: the TOML file (figment), the `SNAKEPIT_CFG_*` variables over it,
//! the `[pools.NAME]` tables over the top-level defaults, and every error as
//! `FILE:LINE: key 'x.y': reason` — figment names the key, the file's spans (`toml_edit`) give
//! its line, and a key set by a variable is reported under the variable's name.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use toml_edit::{ImDocument, Item};

use super::keys::{self, Kind};
use super::validate;
use super::{PoolConfig, PoolsConfig};
use crate::Error;

/// The prefix of the variables read as configuration.
const PREFIX: &str = "SNAKEPIT_CFG_";

/// The worker-source keys: a pool whose `[worker]` names one inherits none of the top level's
/// source-specific keys ([`WorkerConfig::SOURCE_KEYS`](super::WorkerConfig::SOURCE_KEYS)).
const SOURCES: [&str; 3] = ["script", "module", "command"];

/// A configuration file read, with the `SNAKEPIT_CFG_*` variables over it, before it becomes
/// pool configurations.
///
/// [`PoolConfig::load`] and [`PoolsConfig::load`] are the usual way in. This is for a program
/// that changes the configuration after loading it (its own command-line flags, say) and wants
/// errors in the result to still name the file's lines: [`pool`](ConfigFile::pool) extracts a
/// pool unvalidated, and [`check`](ConfigFile::check) validates it afterwards.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    doc: ImDocument<String>,
    /// Key (dotted, as in the merged configuration) → the variable that set it.
    env: BTreeMap<String, String>,
    /// The file with the variables over it.
    merged: Dict,
}

impl ConfigFile {
    /// Reads `path`, with this process's `SNAKEPIT_CFG_*` variables over it.
    pub fn read(path: impl AsRef<Path>) -> Result<ConfigFile, Error> {
        Self::read_with_env(path, std::env::vars_os())
    }

    /// Reads `path` with `vars` as the environment (only the `SNAKEPIT_CFG_*` ones are used);
    /// for tests, and programs that keep configuration variables elsewhere.
    pub fn read_with_env<I, K, V>(path: impl AsRef<Path>, vars: I) -> Result<ConfigFile, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let path = path.as_ref().to_path_buf();
        let origin = path.display().to_string();
        let fail = |line: Option<usize>, reason: String| Error::Config {
            origin: Some(origin.clone()),
            line,
            key: String::new(),
            reason,
            source: None,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| fail(None, format!("cannot read it: {e}")))?;
        let doc = ImDocument::parse(text.clone()).map_err(|e| {
            let line = e.span().map(|s| line_of(&text, s.start));
            fail(line, e.message().trim().replace('\n', "; "))
        })?;
        let mut file: Dict =
            Figment::from(Toml::string(&text)).extract().map_err(|e| fail(None, e.kind.to_string()))?;
        // Relative paths in the file are relative to the file (not to wherever the program
        // runs); those from variables stay relative to the working directory.
        let dir = std::path::absolute(&path).ok().and_then(|p| p.parent().map(Path::to_path_buf));
        if let Some(dir) = &dir {
            anchor_paths(&mut file, dir);
        }
        let pools: Vec<String> = match file.get("pools") {
            Some(Value::Dict(_, d)) => d.keys().cloned().collect(),
            _ => Vec::new(),
        };
        let (overrides, env) = env_overrides(vars, &pools);
        let merged: Dict = Figment::from(Serialized::defaults(file))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| fail(None, e.kind.to_string()))?;
        Ok(ConfigFile { path, doc, env, merged })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The names of the file's `[pools.NAME]` tables (sorted); empty for a single-pool file.
    pub fn pool_names(&self) -> Vec<String> {
        match self.merged.get("pools") {
            Some(Value::Dict(_, d)) => d.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// A pool, its types checked but not validated (see [`check`](ConfigFile::check)): `None`
    /// for the pool of a single-pool file, `Some(name)` for a `[pools.NAME]` table over the
    /// top-level defaults.
    pub fn pool(&self, name: Option<&str>) -> Result<PoolConfig, Error> {
        let pools = self.merged.get("pools");
        if pools.is_some_and(|p| !matches!(p, Value::Dict(..))) {
            let reason = "must be a table of pools (`[pools.NAME]`)".to_string();
            return Err(self.locate(None, &["pools".into()], reason));
        }
        let dict = match (name, pools) {
            (None, None) => self.merged.clone(),
            (None, Some(_)) => {
                return Err(self.locate(None, &["pools".into()], self.several_pools()));
            }
            (Some(n), pools) => {
                let own = match pools {
                    Some(Value::Dict(_, d)) => d.get(n),
                    _ => None,
                };
                match own {
                    Some(Value::Dict(_, own)) => inherit(&self.merged, own),
                    Some(_) => {
                        let reason = "must be a table (`[pools.NAME]`)".to_string();
                        return Err(self.locate(None, &["pools".into(), n.into()], reason));
                    }
                    None => {
                        return Err(Error::Config {
                            origin: Some(self.path.display().to_string()),
                            line: None,
                            key: format!("pools.{n}"),
                            reason: format!("no such pool; the file has: {}", self.names_text()),
                            source: None,
                        });
                    }
                }
            }
        };
        let mut cfg: PoolConfig = Value::Dict(figment::value::Tag::Default, dict)
            .deserialize()
            .map_err(|e| self.extract_error(name, e))?;
        if let (Some(n), None) = (name, &cfg.name) {
            cfg.name = Some(n.to_owned());
        }
        Ok(cfg)
    }

    /// Validates `cfg` (pool `name`, as for [`pool`](ConfigFile::pool)); an error names the
    /// key's line in the file, or the variable that set it.
    pub fn check(&self, name: Option<&str>, cfg: &PoolConfig) -> Result<(), Error> {
        validate::check(cfg).map_err(|i| {
            let path: Vec<String> = i.key.split('.').map(str::to_owned).collect();
            self.locate(name, &path, i.reason)
        })
    }

    fn names_text(&self) -> String {
        let names = self.pool_names();
        if names.is_empty() {
            "no [pools] tables".into()
        } else {
            names.join(", ")
        }
    }

    fn several_pools(&self) -> String {
        format!(
            "this file describes several pools ({}): load it with `PoolsConfig::load` (`snakepit::Pools`), or choose one with `snakepit serve --pool NAME`",
            self.names_text()
        )
    }

    /// An extraction error as a configuration error at its key.
    fn extract_error(&self, pool: Option<&str>, e: figment::Error) -> Error {
        let mut path = e.path.clone();
        let reason = match &e.kind {
            figment::error::Kind::UnknownField(field, expected) => {
                if path.last() != Some(field) {
                    path.push(field.clone());
                }
                format!("unknown key (known here: {})", expected.join(", "))
            }
            figment::error::Kind::UnknownVariant(value, expected) => {
                let names: Vec<String> = expected.iter().map(|n| format!("\"{n}\"")).collect();
                format!("unknown value \"{value}\" (expected {})", names.join(", "))
            }
            kind => kind.to_string(),
        };
        self.locate(pool, &path, reason)
    }

    /// The error for `reason` at `path` (relative to pool `pool`): named after the variable
    /// that set the key, else at the key's line in the file (the pool's own table first, then
    /// the top-level default it inherited), else at the nearest table's line.
    fn locate(&self, pool: Option<&str>, path: &[String], reason: String) -> Error {
        let mut candidates = Vec::new();
        if let Some(n) = pool {
            candidates.push([vec!["pools".to_owned(), n.to_owned()], path.to_vec()].concat());
        }
        candidates.push(path.to_vec());
        let error = |origin: String, line: Option<usize>, key: &[String]| Error::Config {
            origin: Some(origin),
            line,
            key: key.join("."),
            reason: reason.clone(),
            source: None,
        };
        for c in &candidates {
            if let Some(var) = self.env_at(c) {
                return error(var.clone(), None, c);
            }
            if let (true, line) = self.find(c) {
                return error(self.path.display().to_string(), line, c);
            }
        }
        let first = &candidates[0];
        let (_, line) = self.find(first);
        if line.is_none() {
            // Nothing in the file: a variable set something below the key.
            let below = first.join(".") + ".";
            if let Some((_, var)) = self.env.iter().find(|(k, _)| k.starts_with(&below)) {
                return error(var.clone(), None, first);
            }
        }
        error(self.path.display().to_string(), line, first)
    }

    /// The variable that set `path` or a key above it.
    fn env_at(&self, path: &[String]) -> Option<&String> {
        (1..=path.len()).rev().find_map(|n| self.env.get(&path[..n].join(".")))
    }

    /// Whether the file has `path`, and the line of its deepest part the file has.
    fn find(&self, path: &[String]) -> (bool, Option<usize>) {
        let text = self.doc.raw();
        let mut item: &Item = self.doc.as_item();
        let mut line = None;
        for seg in path {
            let Some((key, next)) = item.as_table_like().and_then(|t| t.get_key_value(seg)) else {
                return (false, line);
            };
            if let Some(span) = key.span().or_else(|| next.span()) {
                line = Some(line_of(text, span.start));
            }
            item = next;
        }
        (true, line)
    }
}

/// Makes the file's relative paths (`run_dir`; `[worker]` `script`, `cwd`, `node_path`, and
/// `interpreter` or the `command`'s program when they contain a `/`: a bare name is looked up
/// on `PATH`; `[remote]` `tls_ca`, `tls_cert`, `tls_key`) relative to `dir`, at the top level
/// and in every `[pools.NAME]` table.
fn anchor_paths(file: &mut Dict, dir: &Path) {
    anchor_table(file, dir);
    if let Some(Value::Dict(_, pools)) = file.get_mut("pools") {
        for pool in pools.values_mut() {
            if let Value::Dict(_, t) = pool {
                anchor_table(t, dir);
            }
        }
    }
}

fn anchor_table(t: &mut Dict, dir: &Path) {
    anchor(t.get_mut("run_dir"), dir, false);
    if let Some(Value::Dict(_, r)) = t.get_mut("remote") {
        for key in ["tls_ca", "tls_cert", "tls_key"] {
            anchor(r.get_mut(key), dir, false);
        }
    }
    let Some(Value::Dict(_, w)) = t.get_mut("worker") else { return };
    anchor(w.get_mut("script"), dir, false);
    anchor(w.get_mut("cwd"), dir, false);
    anchor(w.get_mut("interpreter"), dir, true);
    if let Some(Value::Array(_, paths)) = w.get_mut("node_path") {
        for p in paths {
            anchor(Some(p), dir, false);
        }
    }
    // A command line that splits is anchored as its words; one that does not is left for the
    // deserializer to report.
    let split = match w.get("command") {
        Some(Value::String(tag, line)) => shlex::split(line).map(|words| (*tag, words)),
        _ => None,
    };
    if let Some((tag, words)) = split {
        let words: Vec<Value> = words.into_iter().map(|s| Value::String(tag, s)).collect();
        w.insert("command".into(), Value::Array(tag, words));
    }
    if let Some(Value::Array(_, words)) = w.get_mut("command") {
        anchor(words.first_mut(), dir, true);
    }
}

/// `dir.join(value)` for a relative path value (with `program`, only one containing a `/`).
fn anchor(value: Option<&mut Value>, dir: &Path, program: bool) {
    if let Some(Value::String(_, s)) = value {
        if Path::new(s.as_str()).is_relative() && (!program || s.contains('/')) {
            let rel = s.strip_prefix("./").unwrap_or(s);
            *s = dir.join(rel).to_string_lossy().into_owned();
        }
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|b| **b == b'\n').count() + 1
}

/// The top-level defaults (all keys but `pools` and `name`) with a pool's own table over them.
/// A pool's own choice of workers replaces the top level's: a pool whose `[worker]` names a
/// source inherits none of the top level's sources nor its `remote.agents`, and one whose
/// `[remote]` names agents inherits none of the top level's sources.
fn inherit(top: &Dict, own: &Dict) -> Dict {
    let mut base = top.clone();
    base.remove("pools");
    base.remove("name");
    let names_source =
        matches!(own.get("worker"), Some(Value::Dict(_, w)) if SOURCES.iter().any(|s| w.contains_key(*s)));
    let names_agents = match own.get("remote") {
        Some(Value::Dict(_, r)) => match r.get("agents") {
            Some(Value::Array(_, urls)) => !urls.is_empty(),
            Some(Value::String(_, urls)) => urls.split(',').any(|u| !u.trim().is_empty()),
            Some(_) => true,
            None => false,
        },
        _ => false,
    };
    if names_source || names_agents {
        if let Some(Value::Dict(_, w)) = base.get_mut("worker") {
            for s in super::WorkerConfig::SOURCE_KEYS {
                w.remove(*s);
            }
        }
    }
    if names_source {
        if let Some(Value::Dict(_, r)) = base.get_mut("remote") {
            r.remove("agents");
        }
    }
    merge(base, own)
}

/// `over` deep-merged into `base` (tables merge, anything else replaces).
fn merge(mut base: Dict, over: &Dict) -> Dict {
    for (k, v) in over {
        let merged = match (base.remove(k), v) {
            (Some(Value::Dict(tag, b)), Value::Dict(_, o)) => Value::Dict(tag, merge(b, o)),
            (_, v) => v.clone(),
        };
        base.insert(k.clone(), merged);
    }
    base
}

/// The `SNAKEPIT_CFG_*` variables of `vars` as a table to merge over the file, and which
/// variable set which key. A variable naming no key (or a pool the file does not have) is
/// logged and ignored.
fn env_overrides<I, K, V>(vars: I, pools: &[String]) -> (Dict, BTreeMap<String, String>)
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<OsString>,
    V: Into<OsString>,
{
    let mut dict = Dict::new();
    let mut set = BTreeMap::new();
    for (k, v) in vars {
        let (k, v): (OsString, OsString) = (k.into(), v.into());
        if !k.as_encoded_bytes().starts_with(PREFIX.as_bytes()) {
            continue;
        }
        let name = k.to_string_lossy().into_owned();
        let Some(path) = env_key(&name[PREFIX.len()..], pools) else {
            tracing::warn!(variable = %name, "ignoring {name}: it names no configuration key");
            continue;
        };
        let Some(text) = v.to_str() else {
            tracing::warn!(variable = %name, "ignoring {name}: its value is not UTF-8");
            continue;
        };
        let value = match path.1 {
            Kind::Text | Kind::TextTable => Value::from(text.to_owned()),
            Kind::Parsed | Kind::Tree => text.parse::<Value>().unwrap_or_else(|e| match e {}),
        };
        insert(&mut dict, &path.0, value);
        set.insert(path.0.join("."), name);
    }
    (dict, set)
}

/// The key path a variable's name (after the prefix) names, and its kind: parts separated by
/// `__`, lower-cased, except sub-keys of a table or tree (`worker.env.OMP_NUM_THREADS`); a pool
/// is matched by name, ignoring case.
fn env_key(rest: &str, pools: &[String]) -> Option<(Vec<String>, Kind)> {
    if rest.is_empty() || !rest.is_ascii() {
        return None;
    }
    let parts: Vec<&str> = rest.split("__").collect();
    let lower: Vec<String> = parts.iter().map(|p| p.to_ascii_lowercase()).collect();
    let (mut path, skip) = if lower[0] == "pools" {
        let name = parts.get(1)?;
        let pool = pools
            .iter()
            .find(|p| p.as_str() == *name)
            .or_else(|| pools.iter().find(|p| p.eq_ignore_ascii_case(name)))?;
        (vec!["pools".to_owned(), pool.clone()], 2)
    } else {
        (Vec::new(), 0)
    };
    let (kind, n) = keys::lookup(&lower[skip..])?;
    path.extend(lower[skip..skip + n].iter().cloned());
    path.extend(parts[skip + n..].iter().map(|p| (*p).to_owned()));
    if path.iter().any(String::is_empty) {
        return None;
    }
    Some((path, kind))
}

/// Sets `value` at `path` in `dict`, making tables on the way.
fn insert(dict: &mut Dict, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut d = dict;
    for p in parents {
        let entry = d.entry(p.clone()).or_insert_with(|| Value::from(Dict::new()));
        if !matches!(entry, Value::Dict(..)) {
            *entry = Value::from(Dict::new());
        }
        let Value::Dict(_, next) = entry else { return };
        d = next;
    }
    d.insert(last.clone(), value);
}

impl PoolConfig {
    /// Loads the pool a TOML file describes, with this process's `SNAKEPIT_CFG_*` variables
    /// over it, and validates it. A file with `[pools.NAME]` tables is an error: load it with
    /// [`PoolsConfig::load`].
    pub fn load(path: impl AsRef<Path>) -> Result<PoolConfig, Error> {
        Self::load_with_env(path, std::env::vars_os())
    }

    /// [`load`](PoolConfig::load) with `vars` as the environment (for tests: the process's
    /// own environment is not read).
    pub fn load_with_env<I, K, V>(path: impl AsRef<Path>, vars: I) -> Result<PoolConfig, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let file = ConfigFile::read_with_env(path, vars)?;
        let cfg = file.pool(None)?;
        file.check(None, &cfg)?;
        Ok(cfg)
    }

    /// Validates the configuration: ranges, exactly one worker source (or remote agents
    /// instead), what its protocol and transport allow, adapters this build has. [`PoolBuilder::from_config`](crate::PoolBuilder::from_config)
    /// does it too.
    pub fn validate(&self) -> Result<(), Error> {
        validate::check(self).map_err(validate::Invalid::into_error)
    }
}

impl PoolsConfig {
    /// Loads every pool a TOML file describes, with this process's `SNAKEPIT_CFG_*` variables
    /// over it, and validates each. A file without `[pools.NAME]` tables is one pool, named by
    /// its `name` key, else `default`.
    pub fn load(path: impl AsRef<Path>) -> Result<PoolsConfig, Error> {
        Self::load_with_env(path, std::env::vars_os())
    }

    /// [`load`](PoolsConfig::load) with `vars` as the environment.
    pub fn load_with_env<I, K, V>(path: impl AsRef<Path>, vars: I) -> Result<PoolsConfig, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let file = ConfigFile::read_with_env(path, vars)?;
        let mut pools = BTreeMap::new();
        let names = file.pool_names();
        if names.is_empty() {
            if file.merged.contains_key("pools") {
                let reason = "describes no pool (add `[pools.NAME]` tables, or remove `pools`)".to_string();
                return Err(file.locate(None, &["pools".into()], reason));
            }
            let cfg = file.pool(None)?;
            file.check(None, &cfg)?;
            pools.insert(cfg.name.clone().unwrap_or_else(|| "default".into()), cfg);
        }
        for n in names {
            let cfg = file.pool(Some(&n))?;
            file.check(Some(&n), &cfg)?;
            pools.insert(n, cfg);
        }
        Ok(PoolsConfig { pools })
    }
}
