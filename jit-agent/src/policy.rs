//! Who may ask for what, who may approve it, and when access is granted without a human: Cedar
//! policies, validated against a schema when they are loaded, evaluated on every request and
//! every decision. A policy set that fails to parse or validate is refused; a running agent
//! keeps the set it has.
//!
//! Ownership: this module answers "is this permitted, and by which policies"; it never changes
//! state.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr as _,
    sync::{Arc, RwLock},
    time::SystemTime,
};

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

/// The schema shipped with the agent (examples/policies/jit.cedarschema).
pub const DEFAULT_SCHEMA: &str = include_str!("../../examples/policies/jit.cedarschema");

/// The actions policies decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask for access.
    Request,
    /// Be granted at once.
    AutoApprove,
    /// Grant oneself emergency access.
    BreakGlass,
    /// Approve a request.
    Approve,
    /// Deny a request.
    Deny,
    /// Revoke grants.
    Revoke,
}

impl Action {
    /// The Cedar action id.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::AutoApprove => "auto_approve",
            Self::BreakGlass => "break_glass",
            Self::Approve => "approve",
            Self::Deny => "deny",
            Self::Revoke => "revoke",
        }
    }

    /// Every action, for explanations.
    pub const ALL: [Self; 6] = [
        Self::Request,
        Self::AutoApprove,
        Self::BreakGlass,
        Self::Approve,
        Self::Deny,
        Self::Revoke,
    ];

    /// Whether the action is decided when a request is made, with the requester as principal
    /// (`request`, `auto_approve`, `break_glass`).
    #[must_use]
    pub const fn is_at_request(self) -> bool {
        matches!(self, Self::Request | Self::AutoApprove | Self::BreakGlass)
    }
}

/// A problem in a policy or schema file, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: String,
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// 1-based column, 0 when unknown.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// A policy set that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct PolicyError(pub Vec<Problem>);

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

/// Problems of a miette diagnostic, positioned by its labels in `text`.
fn problems(file: &str, text: &str, d: &dyn miette::Diagnostic) -> Vec<Problem> {
    let mut message = d.to_string();
    if let Some(help) = d.help() {
        message.push_str(&format!(" (help: {help})"));
    }
    let labels: Vec<_> = d.labels().map(Iterator::collect).unwrap_or_default();
    if labels.is_empty() {
        return vec![Problem {
            file: file.into(),
            line: 0,
            column: 0,
            message,
        }];
    }
    labels
        .into_iter()
        .take(1)
        .map(|l: miette::LabeledSpan| {
            let (line, column) = line_col(text, l.offset());
            Problem {
                file: file.into(),
                line,
                column,
                message: message.clone(),
            }
        })
        .collect()
}

/// A loaded, validated policy set.
pub struct Loaded {
    policies: PolicySet,
    schema: Schema,
    text: String,
    file: String,
}

impl Loaded {
    /// The policies' display names: their `@id` annotation, else Cedar's id.
    fn name(&self, id: &cedar_policy::PolicyId) -> String {
        let ann = self.policies.annotation(id, "id").map(str::to_string);
        // Cedar does not expose a policy's position; its @id annotation is found in the text.
        let line = ann.as_ref().and_then(|a| {
            self.text
                .find(&format!("@id(\"{a}\")"))
                .map(|off| line_col(&self.text, off).0)
        });
        match (ann, line) {
            (Some(a), Some(l)) => format!("{a} ({}:{l})", self.file),
            (Some(a), None) => a,
            (None, Some(l)) => format!("{id} ({}:{l})", self.file),
            (None, None) => id.to_string(),
        }
    }

    /// The largest `@approvals("N")` among `ids`, if any.
    fn approvals_annotation(&self, ids: &[cedar_policy::PolicyId]) -> Option<u32> {
        ids.iter()
            .filter_map(|id| self.policies.annotation(id, "approvals"))
            .filter_map(|v| v.parse::<u32>().ok())
            .max()
    }
}

/// Parses and validates `policy_text` against `schema_text`.
pub fn load_text(
    policy_file: &str,
    policy_text: &str,
    schema_file: &str,
    schema_text: &str,
) -> Result<Loaded, PolicyError> {
    let (schema, _warnings) = Schema::from_cedarschema_str(schema_text)
        .map_err(|e| PolicyError(problems(schema_file, schema_text, &e)))?;
    let policies = PolicySet::from_str(policy_text)
        .map_err(|e| PolicyError(problems(policy_file, policy_text, &e)))?;
    let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
    let errs: Vec<Problem> = result
        .validation_errors()
        .flat_map(|e| problems(policy_file, policy_text, e))
        .collect();
    if !errs.is_empty() {
        return Err(PolicyError(errs));
    }
    if policies.policies().next().is_none() {
        return Err(PolicyError(vec![Problem {
            file: policy_file.into(),
            line: 0,
            column: 0,
            message: "holds no policy: everything would be denied".into(),
        }]));
    }
    Ok(Loaded {
        policies,
        schema,
        text: policy_text.to_string(),
        file: policy_file.to_string(),
    })
}

/// Reads and loads a policy file, with the schema file or the shipped schema.
pub fn load_files(policy: &Path, schema: Option<&Path>) -> Result<Loaded, PolicyError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| {
            PolicyError(vec![Problem {
                file: p.display().to_string(),
                line: 0,
                column: 0,
                message: format!("cannot read it: {e}"),
            }])
        })
    };
    let text = read(policy)?;
    let (schema_name, schema_text) = match schema {
        Some(s) => (s.display().to_string(), read(s)?),
        None => ("(built-in schema)".to_string(), DEFAULT_SCHEMA.to_string()),
    };
    load_text(
        &policy.display().to_string(),
        &text,
        &schema_name,
        &schema_text,
    )
}

/// Everything a decision looks at besides the policies.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// Who asks (SPIFFE ID).
    pub principal: &'a str,
    /// The principal's groups.
    pub principal_groups: Vec<String>,
    /// Service name.
    pub service: &'a str,
    /// Service environment.
    pub environment: &'a str,
    /// Service maximum, seconds.
    pub max_duration_seconds: u64,
    /// Duration (after clamping), seconds.
    pub duration_seconds: u64,
    /// Reason.
    pub reason: &'a str,
    /// Ticket.
    pub ticket: &'a str,
    /// Requester address.
    pub source_ip: Option<IpAddr>,
    /// Now, Unix ms.
    pub now_ms: i64,
    /// The requester (the principal for request actions).
    pub requester: &'a str,
    /// The requester's groups.
    pub requester_groups: Vec<String>,
    /// Approvals so far.
    pub approvals: u32,
}

/// A decision and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Permitted?
    pub allowed: bool,
    /// The policies that decided (permits when allowed, forbids when denied by one).
    pub policies: Vec<String>,
    /// Evaluation errors (a policy that errors does not apply).
    pub errors: Vec<String>,
    /// The largest `@approvals("N")` on the deciding policies.
    pub approvals: Option<u32>,
}

impl Verdict {
    /// Why, in words, for error messages.
    #[must_use]
    pub fn why(&self) -> String {
        if self.policies.is_empty() {
            "no policy permits it".into()
        } else if self.allowed {
            format!("permitted by {}", self.policies.join(", "))
        } else {
            format!("forbidden by {}", self.policies.join(", "))
        }
    }
}

fn uid(ty: &str, id: &str) -> Result<EntityUid, String> {
    let t = EntityTypeName::from_str(ty).map_err(|e| e.to_string())?;
    Ok(EntityUid::from_type_name_and_id(t, EntityId::new(id)))
}

fn identity_entity(spiffe: &str, groups: &[String]) -> Result<Entity, String> {
    let rest = spiffe.strip_prefix("spiffe://").unwrap_or(spiffe);
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let parents: HashSet<EntityUid> = groups
        .iter()
        .map(|g| uid("Jit::Group", g))
        .collect::<Result<_, _>>()?;
    Entity::new(
        uid("Jit::Identity", spiffe)?,
        HashMap::from([
            (
                "trust_domain".to_string(),
                RestrictedExpression::new_string(domain.to_string()),
            ),
            (
                "path".to_string(),
                RestrictedExpression::new_string(format!("/{path}")),
            ),
        ]),
        parents,
    )
    .map_err(|e| e.to_string())
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Evaluates `action` for `facts` against `loaded`.
fn evaluate(loaded: &Loaded, action: Action, f: &Facts<'_>) -> Result<Verdict, String> {
    let principal = uid("Jit::Identity", f.principal)?;
    let resource = uid("Jit::Service", f.service)?;
    let action_uid = uid("Jit::Action", action.name())?;
    let mut entities = vec![
        identity_entity(f.principal, &f.principal_groups)?,
        Entity::new(
            resource.clone(),
            HashMap::from([
                (
                    "environment".to_string(),
                    RestrictedExpression::new_string(f.environment.to_string()),
                ),
                (
                    "max_duration_seconds".to_string(),
                    RestrictedExpression::new_long(clamp_i64(f.max_duration_seconds)),
                ),
            ]),
            HashSet::new(),
        )
        .map_err(|e| e.to_string())?,
    ];
    if f.requester != f.principal {
        entities.push(identity_entity(f.requester, &f.requester_groups)?);
    }
    for g in f.principal_groups.iter().chain(&f.requester_groups) {
        let e = Entity::new_no_attrs(uid("Jit::Group", g)?, HashSet::new());
        if !entities.iter().any(|x| x.uid() == e.uid()) {
            entities.push(e);
        }
    }
    let entities =
        Entities::from_entities(entities, Some(&loaded.schema)).map_err(|e| e.to_string())?;
    let now = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(f.now_ms) * 1_000_000)
        .map_err(|e| e.to_string())?;
    let ip = f
        .source_ip
        .map_or_else(|| "0.0.0.0".to_string(), |ip| ip.to_canonical().to_string());
    let context = Context::from_pairs([
        (
            "duration_seconds".to_string(),
            RestrictedExpression::new_long(clamp_i64(f.duration_seconds)),
        ),
        (
            "reason".to_string(),
            RestrictedExpression::new_string(f.reason.to_string()),
        ),
        (
            "ticket".to_string(),
            RestrictedExpression::new_string(f.ticket.to_string()),
        ),
        ("source_ip".to_string(), RestrictedExpression::new_ip(ip)),
        (
            "now".to_string(),
            RestrictedExpression::new_datetime(format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                now.year(),
                u8::from(now.month()),
                now.day(),
                now.hour(),
                now.minute(),
                now.second()
            )),
        ),
        (
            "hour".to_string(),
            RestrictedExpression::new_long(i64::from(now.hour())),
        ),
        (
            "weekday".to_string(),
            RestrictedExpression::new_long(i64::from(now.weekday().number_from_monday())),
        ),
        (
            "requester".to_string(),
            RestrictedExpression::new_entity_uid(uid("Jit::Identity", f.requester)?),
        ),
        (
            "approvals".to_string(),
            RestrictedExpression::new_long(i64::from(f.approvals)),
        ),
    ])
    .map_err(|e| e.to_string())?;
    let request = Request::new(
        principal,
        action_uid,
        resource,
        context,
        Some(&loaded.schema),
    )
    .map_err(|e| e.to_string())?;
    let response = Authorizer::new().is_authorized(&request, &loaded.policies, &entities);
    let ids: Vec<cedar_policy::PolicyId> = response.diagnostics().reason().cloned().collect();
    Ok(Verdict {
        allowed: response.decision() == Decision::Allow,
        policies: ids.iter().map(|id| loaded.name(id)).collect(),
        errors: response
            .diagnostics()
            .errors()
            .map(ToString::to_string)
            .collect(),
        approvals: loaded.approvals_annotation(&ids),
    })
}

/// The policy set in force, re-read when its files change.
pub struct Policies {
    policy_file: PathBuf,
    schema_file: Option<PathBuf>,
    state: RwLock<(Arc<Loaded>, Vec<Option<SystemTime>>)>,
}

fn mtimes(files: &[&Path]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

impl Policies {
    /// Loads the files; fails when they do not make a valid set.
    pub fn load(policy_file: &Path, schema_file: Option<&Path>) -> Result<Self, PolicyError> {
        let loaded = load_files(policy_file, schema_file)?;
        let me = Self {
            policy_file: policy_file.to_path_buf(),
            schema_file: schema_file.map(Path::to_path_buf),
            state: RwLock::new((Arc::new(loaded), Vec::new())),
        };
        let times = mtimes(&me.file_refs());
        me.write().1 = times;
        Ok(me)
    }

    /// A fixed set, for tests and `policy explain`.
    #[must_use]
    pub fn from_loaded(loaded: Loaded) -> Self {
        Self {
            policy_file: PathBuf::from(&loaded.file),
            schema_file: None,
            state: RwLock::new((Arc::new(loaded), Vec::new())),
        }
    }

    /// The files the set is read from (policy, and schema when one is configured).
    #[must_use]
    pub fn files(&self) -> Vec<PathBuf> {
        self.file_refs()
            .into_iter()
            .map(Path::to_path_buf)
            .collect()
    }

    fn file_refs(&self) -> Vec<&Path> {
        let mut v = vec![self.policy_file.as_path()];
        if let Some(s) = &self.schema_file {
            v.push(s.as_path());
        }
        v
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, (Arc<Loaded>, Vec<Option<SystemTime>>)> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn current(&self) -> Arc<Loaded> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone()
    }

    /// Decides `action` for `facts`. An evaluation failure denies (fail closed).
    #[must_use]
    pub fn decide(&self, action: Action, facts: &Facts<'_>) -> Verdict {
        evaluate(&self.current(), action, facts).unwrap_or_else(|e| Verdict {
            allowed: false,
            policies: Vec::new(),
            errors: vec![e],
            approvals: None,
        })
    }

    /// Re-reads the files if they changed. `Ok(true)` when a new set took effect, `Err` with
    /// the problems when a changed set was refused (the previous one stays in force).
    pub fn reload_if_changed(&self) -> Result<bool, PolicyError> {
        let now = mtimes(&self.file_refs());
        if self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            == now
        {
            return Ok(false);
        }
        let mut state = self.write();
        state.1 = now;
        let loaded = load_files(&self.policy_file, self.schema_file.as_deref())?;
        state.0 = Arc::new(loaded);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_lines_and_columns() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }

    #[test]
    fn the_shipped_schema_and_examples_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
        load_files(
            &dir.join("policies.cedar"),
            Some(&dir.join("jit.cedarschema")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn problems_carry_line_and_column() {
        let bad = "permit (principal, action == Jit::Action::\"request\", resource)\nwhen { context.nope == 1 };";
        let e = load_text("p.cedar", bad, "s", DEFAULT_SCHEMA)
            .err()
            .expect("invalid");
        let p = &e.0[0];
        assert_eq!((p.file.as_str(), p.line), ("p.cedar", 2), "{e}");
        assert!(p.column > 1, "{e}");
        let syntax = load_text(
            "p.cedar",
            "permit (principal, action, resource) when {",
            "s",
            DEFAULT_SCHEMA,
        )
        .err()
        .expect("unparseable");
        assert_eq!(syntax.0[0].line, 1, "{syntax}");
    }
}
