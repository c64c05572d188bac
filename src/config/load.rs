//! Reading the configuration: the TOML file and the `LABELHOOK__` variables are merged into
//! one value tree (by the `config` crate), and each section and each `[[...]]` element is then
//! deserialized on its own, strictly (a string is not a boolean, a number is not a duration).
//!
//! Every problem is reported in one run: a key whose value is wrong is reported, set aside
//! (so that its default applies) and the rest of its section tried again; checks that would
//! only repeat a problem already reported about the same key are dropped. A value is shown in
//! its message, except under `secrets`, `password`, `token`, `credentials` and `api_key`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{keys, ConfigError, Problem, Settings};

/// Keys under which a value is a secret, or holds one: their values are never shown.
pub(super) const SECRET_KEYS: [&str; 5] =
    ["secrets", "password", "token", "credentials", "api_key"];

/// Keys a `LABELHOOK__` variable gives as a comma-separated list.
const LIST_KEYS: [&str; 4] = [
    "network.allowlist",
    "network.trusted_proxies",
    "model_training.model_types",
    "model_training.allowlist",
];

/// The top-level keys, in the order they are checked.
const SECTIONS: [&str; 11] = [
    "server",
    "network",
    "store",
    "dispatch",
    "log",
    "admin",
    "endpoint",
    "model_training",
    "handler",
    "route",
    "labelbox",
];

/// Most problems reported for one section or element (each pass sets one value aside).
const MAX_PROBLEMS_PER_PART: usize = 64;

/// A key set by a `LABELHOOK__` environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvOverride {
    /// The key, e.g. `server.listen`.
    pub key: String,
    /// The variable, e.g. `LABELHOOK__SERVER__LISTEN`.
    pub variable: String,
    /// True when the file sets the key too: the variable wins over the file.
    pub overrides_file: bool,
}

/// Settings as far as they could be read, and the problems found so far.
pub(super) struct Draft {
    pub settings: Settings,
    problems: Vec<Problem>,
    /// Keys whose value was refused: later checks about them would only repeat that.
    refused: Vec<String>,
    /// Names of `[[handler]]`s that could not be read: routes naming them are not wrong.
    pub unread_handlers: BTreeSet<String>,
    /// For `endpoint`, `handler` and `route`: the index in the file of each element read,
    /// so that later problems name the element as the file has it.
    file_index: Vec<(&'static str, Vec<usize>)>,
}

/// Reads `path` (a missing file is an error only when `required`) and the `LABELHOOK__`
/// variables of `env`, and deserializes what they say, collecting problems.
pub(super) fn read(
    path: &Path,
    env: &HashMap<String, String>,
    required: bool,
) -> Result<Draft, ConfigError> {
    let text = if path.exists() {
        Some(
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?,
        )
    } else if required {
        return Err(ConfigError::Read {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    } else {
        None
    };
    let with_file = |builder: config::ConfigBuilder<config::builder::DefaultState>| match &text {
        Some(text) => builder.add_source(config::File::from_str(text, config::FileFormat::Toml)),
        None => builder,
    };
    let file_tree = tree(with_file(config::Config::builder()))
        .map_err(|e| ConfigError::Invalid(vec![syntax_problem(path, &e)]))?;

    let variables: config::Map<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with("LABELHOOK__"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut environment = config::Environment::with_prefix("LABELHOOK")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .list_separator(",");
    for key in LIST_KEYS {
        environment = environment.with_list_parse_key(key);
    }
    let from_environment = env_overrides(&variables, &file_tree);
    let merged =
        tree(with_file(config::Config::builder()).add_source(environment.source(Some(variables))))
            .map_err(|e| {
                ConfigError::Invalid(vec![Problem {
                    key: "LABELHOOK__ variables".to_owned(),
                    message: e.to_string(),
                }])
            })?;

    let mut draft = Draft {
        settings: Settings {
            from_environment,
            ..Settings::default()
        },
        problems: Vec::new(),
        refused: Vec::new(),
        unread_handlers: BTreeSet::new(),
        file_index: Vec::new(),
    };
    draft.read_sections(merged);
    Ok(draft)
}

/// The tree a builder's sources make.
fn tree(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
) -> Result<Value, config::ConfigError> {
    builder.build()?.try_deserialize::<Value>()
}

/// A TOML syntax error, named by the file, without the excerpt of the file the parser quotes
/// (the line may hold a secret).
fn syntax_problem(path: &Path, error: &config::ConfigError) -> Problem {
    let text = error.to_string();
    let excerpt = |line: &str| {
        let line = line.trim_start();
        line.starts_with('|')
            || line.split_once('|').is_some_and(|(number, _)| {
                let number = number.trim();
                !number.is_empty() && number.chars().all(|c| c.is_ascii_digit())
            })
    };
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !excerpt(l))
        .collect();
    let message = parts.join(": ");
    let message = message
        .strip_prefix("TOML parse error at ")
        .map_or_else(|| message.clone(), |rest| format!("not valid TOML: {rest}"));
    Problem {
        key: path.display().to_string(),
        message,
    }
}

/// The keys the `LABELHOOK__` variables set, and whether the file sets them too.
fn env_overrides(variables: &config::Map<String, String>, file: &Value) -> Vec<EnvOverride> {
    let mut found: Vec<EnvOverride> = variables
        .keys()
        .filter_map(|variable| {
            let rest = variable.strip_prefix("LABELHOOK__")?;
            if rest.is_empty() {
                return None;
            }
            let key = rest.to_lowercase().replace("__", ".");
            let overrides_file = key
                .split('.')
                .try_fold(file, |node, part| node.get(part))
                .is_some();
            Some(EnvOverride {
                key,
                variable: variable.clone(),
                overrides_file,
            })
        })
        .collect();
    found.sort_by(|a, b| a.key.cmp(&b.key));
    found
}

impl Draft {
    fn read_sections(&mut self, merged: Value) {
        let Value::Object(root) = merged else {
            return;
        };
        // Checked in a fixed order, so that problems come out in the same order every time.
        let mut root: Vec<(String, Value)> = root.into_iter().collect();
        root.sort_by_key(|(k, _)| SECTIONS.iter().position(|s| s == k).unwrap_or(usize::MAX));
        for (key, value) in root {
            match key.as_str() {
                "server" => {
                    if let Some(s) = self.part(value, vec![Seg::key(&key)]) {
                        self.settings.server = s;
                    }
                }
                "network" => {
                    if let Some(s) = self.part(value, vec![Seg::key(&key)]) {
                        self.settings.network = s;
                    }
                }
                "store" => {
                    if let Some(s) = self.part(value, vec![Seg::key(&key)]) {
                        self.settings.store = s;
                    }
                }
                "dispatch" => {
                    if let Some(s) = self.part(value, vec![Seg::key(&key)]) {
                        self.settings.dispatch = s;
                    }
                }
                "log" => {
                    if let Some(s) = self.part(value, vec![Seg::key(&key)]) {
                        self.settings.log = s;
                    }
                }
                "admin" => {
                    if let Some(s) = self.part(value, vec![Seg::key(&key)]) {
                        self.settings.admin = s;
                    }
                }
                "model_training" => {
                    self.settings.model_training = self.part(value, vec![Seg::key(&key)]);
                }
                "endpoint" => self.settings.endpoint = self.elements(value, "endpoint"),
                "handler" => {
                    if let Value::Array(list) = &value {
                        for handler in list {
                            if let Some(name) = handler.get("name").and_then(Value::as_str) {
                                self.unread_handlers.insert(name.to_owned());
                            }
                        }
                    }
                    self.settings.handler = self.elements(value, "handler");
                    for handler in &self.settings.handler {
                        self.unread_handlers.remove(&handler.name);
                    }
                }
                "route" => self.settings.route = self.elements(value, "route"),
                "labelbox" => self.settings.labelbox = self.part(value, vec![Seg::key(&key)]),
                _ => {
                    let sections = SECTIONS.map(str::to_owned);
                    let unknown = keys::unknown(&key, &sections, None, None);
                    self.refuse(key.clone(), unknown.message);
                }
            }
        }
    }

    /// `[[name]]`: each element read on its own.
    fn elements<T: DeserializeOwned>(&mut self, value: Value, name: &'static str) -> Vec<T> {
        let Value::Array(list) = value else {
            let got = describe(&value);
            self.refuse(
                name.to_owned(),
                format!("expected a list of tables ([[{name}]]), got {got}"),
            );
            return Vec::new();
        };
        let mut read = Vec::new();
        let mut index = Vec::new();
        for (i, element) in list.into_iter().enumerate() {
            if let Some(element) = self.part(element, vec![Seg::key(name), Seg::Index(i)]) {
                read.push(element);
                index.push(i);
            }
        }
        self.file_index.push((name, index));
        read
    }

    /// Deserializes one section or element. On a problem, the value at fault is reported and
    /// set aside, and the rest is tried again, until it reads or a required key is missing.
    fn part<T: DeserializeOwned>(&mut self, mut value: Value, base: Vec<Seg>) -> Option<T> {
        // Elements of lists taken out, as (the list's path in the file, index in the file).
        let mut taken: Vec<(Vec<Seg>, usize)> = Vec::new();
        let mut refused_here: Vec<Vec<Seg>> = Vec::new();
        for _ in 0..MAX_PROBLEMS_PER_PART {
            let error = match serde_path_to_error::deserialize::<_, T>(&value) {
                Ok(read) => return Some(read),
                Err(e) => e,
            };
            let mut current: Vec<Seg> = error.path().iter().filter_map(Seg::from_serde).collect();
            let message = error.into_inner().to_string();
            if let Some(name) = between(&message, "missing field `", "`") {
                let mut key = in_file(&current, &taken);
                key.push(Seg::key(name));
                // A required key whose value was refused above has been reported already.
                if !refused_here.contains(&key) {
                    self.refuse(render(&base, &key), "is required".to_owned());
                }
                return None;
            }
            let mut explained = explain(&message);
            let mut meant = None;
            if let Some(name) = between(&message, "unknown field `", "`") {
                if current.last() != Some(&Seg::key(name)) {
                    current.push(Seg::key(name));
                }
                let unknown = unknown_key(&base, &current, &value, &message);
                explained = unknown.message;
                meant = unknown.meant;
            }
            let key = in_file(&current, &taken);
            let whole = base.iter().chain(&key).cloned().collect::<Vec<_>>();
            if is_secret(&whole) && !explained.starts_with("unknown key") {
                explained = secret_hint(&whole);
            }
            self.refuse(render(&base, &key), explained);
            if let Some(meant) = meant {
                // The value given under the misspelt key was meant for this one: a problem
                // about this one (missing, say) would only repeat the one just reported.
                let mut sibling = key.clone();
                sibling.pop();
                sibling.push(Seg::Key(meant));
                self.refused.push(render(&base, &sibling));
                refused_here.push(sibling);
            }
            if !take_out(&mut value, &current) {
                return None;
            }
            match key.split_last() {
                Some((Seg::Index(i), list)) => taken.push((list.to_vec(), *i)),
                _ => refused_here.push(key),
            }
        }
        None
    }

    fn refuse(&mut self, key: String, message: String) {
        self.refused.push(key.clone());
        self.problems.push(Problem { key, message });
    }

    /// Adds problems found by later checks, naming elements by their index in the file and
    /// leaving out those about a key whose value was refused (or its parts and parents).
    pub fn add_checked(&mut self, found: Vec<Problem>) {
        for mut problem in found {
            problem.key = self.file_key(&problem.key);
            let repeats = self
                .refused
                .iter()
                .any(|refused| related(refused, &problem.key));
            if !repeats {
                self.problems.push(problem);
            }
        }
    }

    /// `handler[1].url` of the settings read is `handler[2].url` in the file when the
    /// file's `handler[1]` could not be read.
    fn file_key(&self, key: &str) -> String {
        for (name, index) in &self.file_index {
            let Some(rest) = key.strip_prefix(name).and_then(|r| r.strip_prefix('[')) else {
                continue;
            };
            let Some((number, tail)) = rest.split_once(']') else {
                continue;
            };
            if let Some(i) = number.parse::<usize>().ok().and_then(|n| index.get(n)) {
                return format!("{name}[{i}]{tail}");
            }
        }
        key.to_owned()
    }

    /// The settings, or every problem, each naming the variable that set its key if one did.
    pub fn finish(self) -> Result<Settings, ConfigError> {
        if self.problems.is_empty() {
            return Ok(self.settings);
        }
        let overrides = &self.settings.from_environment;
        let problems = self
            .problems
            .into_iter()
            .map(|mut problem| {
                let set_by = overrides.iter().find(|o| {
                    problem.key == o.key
                        || problem.key.starts_with(&format!("{}.", o.key))
                        || problem.key.starts_with(&format!("{}[", o.key))
                });
                if let Some(o) = set_by {
                    problem.message = format!("{} (set by {})", problem.message, o.variable);
                }
                problem
            })
            .collect();
        Err(ConfigError::Invalid(problems))
    }
}

/// One step of a key's path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    fn key(name: &str) -> Seg {
        Seg::Key(name.to_owned())
    }

    fn from_serde(segment: &serde_path_to_error::Segment) -> Option<Seg> {
        use serde_path_to_error::Segment;
        match segment {
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            Segment::Unknown => None,
        }
    }
}

/// The message for the unknown key at the end of `current` (a path in `value`, the section or
/// element at `base`), from serde's `message`: in a `[[handler]]` of a kind that reads, only
/// that kind's keys are offered.
fn unknown_key(base: &[Seg], current: &[Seg], value: &Value, message: &str) -> keys::Unknown {
    let Some((Seg::Key(given), parents)) = current.split_last() else {
        return keys::unknown("", &[], None, None);
    };
    let table = parents.iter().try_fold(value, |node, seg| match seg {
        Seg::Key(k) => node.get(k),
        Seg::Index(i) => node.get(*i),
    });
    let in_handler = parents.is_empty() && base.first() == Some(&Seg::key("handler"));
    let kind = table.filter(|_| in_handler).and_then(keys::handler_kind);
    let known: Vec<String> = match kind {
        Some(kind) => kind.keys().into_iter().map(str::to_owned).collect(),
        None => keys::expected_keys(message),
    };
    keys::unknown(given, &known, table.and_then(Value::as_object), kind)
}

/// `endpoint[0].secrets[1].env`.
fn render(base: &[Seg], path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in base.iter().chain(path) {
        match seg {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The path in the file of a path in the value being read, from which the list elements in
/// `taken` were removed.
fn in_file(current: &[Seg], taken: &[(Vec<Seg>, usize)]) -> Vec<Seg> {
    let mut out: Vec<Seg> = Vec::new();
    for seg in current {
        match seg {
            Seg::Index(k) => {
                let mut gone: Vec<usize> = taken
                    .iter()
                    .filter(|(list, _)| *list == out)
                    .map(|(_, i)| *i)
                    .collect();
                gone.sort_unstable();
                let mut i = *k;
                for g in gone {
                    if g <= i {
                        i += 1;
                    }
                }
                out.push(Seg::Index(i));
            }
            key => out.push(key.clone()),
        }
    }
    out
}

/// Removes the value at `path`; false when there is nothing there to remove.
fn take_out(value: &mut Value, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = value;
    for seg in parents {
        let next = match (seg, node) {
            (Seg::Key(k), Value::Object(map)) => map.get_mut(k),
            (Seg::Index(i), Value::Array(list)) => list.get_mut(*i),
            _ => None,
        };
        let Some(next) = next else {
            return false;
        };
        node = next;
    }
    match (last, node) {
        (Seg::Key(k), Value::Object(map)) => map.remove(k).is_some(),
        (Seg::Index(i), Value::Array(list)) if *i < list.len() => {
            list.remove(*i);
            true
        }
        _ => false,
    }
}

/// Same key, or one inside the other (`a.b` and `a.b.c`, `a` and `a[0]`).
fn related(a: &str, b: &str) -> bool {
    let inside = |inner: &str, outer: &str| {
        inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
    };
    inside(a, b) || inside(b, a)
}

fn is_secret(path: &[Seg]) -> bool {
    path.iter()
        .any(|seg| matches!(seg, Seg::Key(k) if SECRET_KEYS.contains(&k.as_str())))
}

/// What a secret's value should look like, without showing it.
fn secret_hint(path: &[Seg]) -> String {
    let last_key = path.iter().rev().find_map(|seg| match seg {
        Seg::Key(k) => Some(k.as_str()),
        Seg::Index(_) => None,
    });
    let form = match (last_key, path.last()) {
        (Some("env" | "file" | "value"), _) => "expected a string",
        (Some("secrets"), Some(Seg::Key(_))) => {
            "expected a list like [{ env = \"VAR\" }, { file = \"/path\" }]"
        }
        _ => "expected one of { env = \"VAR\" }, { file = \"/path\" } or { value = \"...\" }",
    };
    format!("{form} (the value is not shown: it may be a secret)")
}

/// The text between `start` and the next `end`.
fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = text.split_once(start)?.1;
    Some(rest.split_once(end)?.0)
}

/// serde's "invalid type: string \"yes\", expected a boolean" as "expected true or false,
/// got \"yes\"".
fn explain(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((got, expected)) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once(", expected "))
        {
            return format!(
                "expected {}, got {}",
                expected_words(expected),
                got_words(got)
            );
        }
    }
    if let Some(variant) = between(message, "unknown variant `", "`") {
        if let Some((_, expected)) = message.split_once(", expected ") {
            return format!("expected {expected}, got {variant:?}");
        }
    }
    message.to_owned()
}

fn expected_words(expected: &str) -> String {
    match expected {
        "a boolean" => "true or false".to_owned(),
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number, 0 or more".to_owned(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "a sequence" => "a list".to_owned(),
        "a map" => "a table".to_owned(),
        other if other.starts_with("struct ") => "a table".to_owned(),
        other => other.to_owned(),
    }
}

fn got_words(got: &str) -> String {
    for kind in [
        "string ",
        "integer ",
        "floating point ",
        "boolean ",
        "character ",
    ] {
        if let Some(value) = got.strip_prefix(kind) {
            return value.trim_matches('`').to_owned();
        }
    }
    match got {
        "map" => "a table".to_owned(),
        "sequence" => "a list".to_owned(),
        "unit value" => "nothing".to_owned(),
        other => other.to_owned(),
    }
}

/// A value's kind, for "expected ..., got a table".
fn describe(value: &Value) -> String {
    match value {
        Value::Object(_) => "a table".to_owned(),
        Value::Array(_) => "a list".to_owned(),
        Value::Null => "nothing".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_render_with_a_dot_after_an_index() {
        let path = [Seg::key("route"), Seg::Index(0), Seg::key("deliver_stale")];
        assert_eq!(render(&path, &[]), "route[0].deliver_stale");
    }

    #[test]
    fn indices_after_removed_elements_are_those_of_the_file() {
        let list = vec![Seg::key("allowlist")];
        let taken = vec![(list.clone(), 1), (list, 2)];
        let current = [Seg::key("allowlist"), Seg::Index(1)];
        assert_eq!(
            in_file(&current, &taken),
            vec![Seg::key("allowlist"), Seg::Index(3)]
        );
    }

    #[test]
    fn related_keys_are_the_same_key_or_inside_one_another() {
        assert!(related("network.allow_all", "network.allow_all"));
        assert!(related(
            "endpoint[0].secrets[1]",
            "endpoint[0].secrets[1].env"
        ));
        assert!(!related("network.allow_all", "network.allowlist"));
        assert!(!related("handler[1]", "handler[10]"));
    }

    #[test]
    fn serde_messages_become_expected_and_got() {
        assert_eq!(
            explain("invalid type: string \"yes\", expected a boolean"),
            "expected true or false, got \"yes\""
        );
        assert_eq!(
            explain("invalid type: integer `5`, expected a string"),
            "expected a string, got 5"
        );
        assert_eq!(
            explain("unknown variant `htp`, expected one of `log`, `file`"),
            "expected one of `log`, `file`, got \"htp\""
        );
    }
}
