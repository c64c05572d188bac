//! `labelhook labelbox webhooks list` and `apply`: Labelbox's webhooks held against the
//! `[[labelbox.webhook]]` entries, and the plan that makes Labelbox match them (LABELBOX.md 9.2).
//!
//! Which webhooks are ours: those whose URL is a configured one (labelhook's own query
//! parameter aside), and those labelhook created with one of our endpoints' secrets (their URL
//! carries its [`secret_id`], whatever the host: a move is then an update). Nothing else is
//! ever changed.
//!
//! A webhook's secret cannot be read back nor updated, so the URL labelhook creates a webhook
//! with carries `labelhook_secret_id=<id>`: a short HMAC of the secret that identifies it
//! without revealing it. A configured secret whose id no webhook carries needs a new webhook;
//! the one with the old id is then set INACTIVE, after the new one is active (rotation).

use std::collections::{BTreeSet, HashSet};

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Sha256;

use super::api::Api;
use super::settings::{LabelboxSettings, SECRET_ID_PARAM};
use super::EndpointSecrets;
use super::{LabelboxError, Outcome};

/// Webhooks per page of a list (the SDK's page size).
const PAGE: usize = 100;
/// The fields every webhook answer carries (the SDK's).
const FIELDS: &str = "createdAt status topics id updatedAt url";
/// What a secret id is an HMAC of, keyed with the secret.
const SECRET_ID_MESSAGE: &[u8] = b"labelhook webhook secret id";
pub const ACTIVE: &str = "ACTIVE";
const INACTIVE: &str = "INACTIVE";

/// A short id of `secret`: 12 hex digits of an HMAC-SHA256 keyed with it. It names the secret
/// in a webhook's URL without revealing it: anyone who sees the URL learns no more than from a
/// signed delivery, which they could test guesses against as well.
pub fn secret_id(secret: &SecretString) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.expose_secret().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(SECRET_ID_MESSAGE);
    hex::encode(&mac.finalize().into_bytes()[..6])
}

/// `url` with labelhook's secret id parameter added.
fn with_secret_id(url: &str, id: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            parsed.query_pairs_mut().append_pair(SECRET_ID_PARAM, id);
            parsed.to_string()
        }
        Err(_) => url.to_owned(),
    }
}

/// A URL without labelhook's parameter, and that parameter's value when it has one.
fn split_secret_id(url: &str) -> (String, Option<String>) {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return (url.to_owned(), None);
    };
    let mut id = None;
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter_map(|(k, v)| {
            if k == SECRET_ID_PARAM {
                id = Some(v.into_owned());
                None
            } else {
                Some((k.into_owned(), v.into_owned()))
            }
        })
        .collect();
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    (parsed.to_string(), id)
}

/// Who a webhook is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Not asked: a webhook of the organization list that is not ours and not in a configured
    /// project's list (the organization's own, or another project's).
    #[default]
    Unknown,
    Organization,
    Project(String),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Unknown => f.pad("-"),
            Scope::Organization => f.pad("organization"),
            Scope::Project(id) => f.pad(&format!("project {id}")),
        }
    }
}

/// A webhook as Labelbox lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct Webhook {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub topics: Vec<String>,
    pub url: String,
    #[serde(skip)]
    pub scope: Scope,
}

/// A webhook the configuration wants.
pub struct Wanted {
    pub scope: Scope,
    /// Sorted.
    pub topics: Vec<String>,
    /// The configured URL with the secret id.
    pub url: String,
    pub secret_id: String,
    pub endpoint: String,
    pub secret_index: usize,
    secret: SecretString,
}

/// What `apply` does, step by step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Create {
        wanted: usize,
    },
    Update {
        id: String,
        wanted: usize,
        /// The topics now, when they change.
        topics: Option<Vec<String>>,
        /// The URL now, when it changes.
        url: Option<String>,
        /// An INACTIVE webhook of ours with this very URL (so this secret) made ACTIVE again.
        activate: bool,
    },
    Retire {
        id: String,
    },
}

/// The webhooks the configuration wants, each with its endpoint's secret.
pub fn wanted(
    settings: &LabelboxSettings,
    endpoint_secrets: &EndpointSecrets,
) -> Result<Vec<Wanted>, LabelboxError> {
    settings
        .webhook
        .iter()
        .enumerate()
        .map(|(i, hook)| {
            let secrets = endpoint_secrets
                .get(&hook.endpoint)
                .map_or(&[][..], Vec::as_slice);
            let index = hook.secret_index();
            let secret = secrets.get(index).cloned().ok_or_else(|| {
                LabelboxError::Setup(format!(
                    "labelbox.webhook[{i}]: endpoint {:?} has no secret {index}",
                    hook.endpoint
                ))
            })?;
            let id = secret_id(&secret);
            let mut topics = hook.topics.clone();
            topics.sort();
            topics.dedup();
            Ok(Wanted {
                scope: hook
                    .scope()
                    .map_or(Scope::Organization, |p| Scope::Project(p.to_owned())),
                topics,
                url: with_secret_id(&hook.url, &id),
                secret_id: id,
                endpoint: hook.endpoint.clone(),
                secret_index: index,
                secret,
            })
        })
        .collect()
}

/// Tells our webhooks from the rest.
pub struct Ours {
    urls: HashSet<String>,
    secret_ids: HashSet<String>,
}

impl Ours {
    pub fn new(settings: &LabelboxSettings, endpoint_secrets: &EndpointSecrets) -> Self {
        let urls = settings
            .webhook
            .iter()
            .map(|h| split_secret_id(&h.url).0)
            .collect();
        let secret_ids = endpoint_secrets.values().flatten().map(secret_id).collect();
        Self { urls, secret_ids }
    }

    pub fn contains(&self, hook: &Webhook) -> bool {
        let (base, id) = split_secret_id(&hook.url);
        self.urls.contains(&base) || id.is_some_and(|id| self.secret_ids.contains(&id))
    }
}

#[derive(Deserialize)]
struct OrganizationData {
    organization: WebhookList,
}

#[derive(Deserialize)]
struct ProjectData {
    project: Option<WebhookList>,
}

#[derive(Deserialize)]
struct WebhookList {
    webhooks: Vec<Webhook>,
}

#[derive(Deserialize)]
struct WebhookData {
    webhook: Option<WebhookProject>,
}

#[derive(Deserialize)]
struct WebhookProject {
    project: Option<IdOnly>,
}

#[derive(Deserialize)]
pub(super) struct IdOnly {
    pub id: String,
}

/// Every webhook of the organization, those of the configured projects known as theirs, and
/// the scope of each of ours asked for.
pub async fn fetch(
    api: &Api,
    settings: &LabelboxSettings,
    ours: &Ours,
) -> Result<Vec<Webhook>, LabelboxError> {
    let mut all = Vec::new();
    for skip in (0..).step_by(PAGE) {
        let query = format!(
            "query ListOrganizationWebhooksPyApi {{ organization {{ webhooks(skip: {skip} first: {PAGE}) {{ {FIELDS} }} }} }}"
        );
        let page: OrganizationData = api
            .call("listing the organization's webhooks", &query, Value::Null)
            .await?;
        let n = page.organization.webhooks.len();
        all.extend(page.organization.webhooks);
        if n < PAGE {
            break;
        }
    }
    let projects: BTreeSet<&str> = settings.webhook.iter().filter_map(|h| h.scope()).collect();
    for project in projects {
        for hook in project_webhooks(api, project).await? {
            match all.iter_mut().find(|h| h.id == hook.id) {
                Some(known) => known.scope = Scope::Project(project.to_owned()),
                None => all.push(Webhook {
                    scope: Scope::Project(project.to_owned()),
                    ..hook
                }),
            }
        }
    }
    for hook in all.iter_mut() {
        if hook.scope == Scope::Unknown && ours.contains(hook) {
            hook.scope = scope_of(api, &hook.id).await?;
        }
    }
    Ok(all)
}

async fn project_webhooks(api: &Api, project: &str) -> Result<Vec<Webhook>, LabelboxError> {
    let mut found = Vec::new();
    for skip in (0..).step_by(PAGE) {
        let query = format!(
            "query ListProjectWebhooksPyApi($param_0: ID!) {{ project(where: {{id: $param_0}}) {{ webhooks(skip: {skip} first: {PAGE}) {{ {FIELDS} }} }} }}"
        );
        let page: ProjectData = api
            .call(
                "listing a project's webhooks",
                &query,
                json!({ "param_0": project }),
            )
            .await
            .map_err(|e| e.for_project(project))?;
        let list = page
            .project
            .ok_or_else(|| LabelboxError::ProjectNotFound(project.to_owned()))?;
        let n = list.webhooks.len();
        found.extend(list.webhooks);
        if n < PAGE {
            break;
        }
    }
    Ok(found)
}

async fn scope_of(api: &Api, id: &str) -> Result<Scope, LabelboxError> {
    let data: WebhookData = api
        .call(
            "asking a webhook's project",
            "query WebhookProjectPyApi($param_0: ID!) { webhook(where: {id: $param_0}) { project { id } } }",
            json!({ "param_0": id }),
        )
        .await?;
    Ok(match data.webhook.and_then(|w| w.project) {
        Some(project) => Scope::Project(project.id),
        None => Scope::Organization,
    })
}

/// What makes Labelbox match `wanted`: for each wanted webhook, ours of its scope with the same
/// URL (its topics updated), else one with its secret id at another URL (moved: its URL
/// updated), else an INACTIVE one with the same URL (made ACTIVE again), else a new one; then
/// every other ACTIVE webhook of ours is retired.
pub fn plan(wanted: &[Wanted], existing: &[Webhook], ours: &Ours) -> Vec<Step> {
    let mine: Vec<bool> = existing.iter().map(|h| ours.contains(h)).collect();
    let mut taken = vec![false; existing.len()];
    let mut steps = Vec::new();
    for (w, want) in wanted.iter().enumerate() {
        let find = |matches: &dyn Fn(&Webhook) -> bool| {
            existing
                .iter()
                .enumerate()
                .position(|(i, h)| mine[i] && !taken[i] && h.scope == want.scope && matches(h))
        };
        let same_url = find(&|h| h.status == ACTIVE && h.url == want.url);
        let moved = || {
            find(&|h| {
                h.status == ACTIVE && split_secret_id(&h.url).1.as_deref() == Some(&want.secret_id)
            })
        };
        let dormant = || find(&|h| h.status == INACTIVE && h.url == want.url);
        let Some(i) = same_url.or_else(moved).or_else(dormant) else {
            steps.push(Step::Create { wanted: w });
            continue;
        };
        taken[i] = true;
        let hook = &existing[i];
        let mut topics = hook.topics.clone();
        topics.sort();
        topics.dedup();
        let update = Step::Update {
            id: hook.id.clone(),
            wanted: w,
            topics: (topics != want.topics).then(|| want.topics.clone()),
            url: (hook.url != want.url).then(|| want.url.clone()),
            activate: hook.status != ACTIVE,
        };
        if update
            != (Step::Update {
                id: hook.id.clone(),
                wanted: w,
                topics: None,
                url: None,
                activate: false,
            })
        {
            steps.push(update);
        }
    }
    for (i, hook) in existing.iter().enumerate() {
        if mine[i] && !taken[i] && hook.status == ACTIVE {
            steps.push(Step::Retire {
                id: hook.id.clone(),
            });
        }
    }
    steps
}

/// A GraphQL string literal: JSON's escapes are GraphQL's.
fn literal(text: &str) -> String {
    Value::from(text).to_string()
}

/// Creates one webhook, as the SDK does (values spliced into the text, escaped here).
async fn create(api: &Api, want: &Wanted) -> Result<Webhook, LabelboxError> {
    let project = match &want.scope {
        Scope::Project(id) => format!("project:{{id:{}}}, ", literal(id)),
        _ => String::new(),
    };
    let query = format!(
        "mutation CreateWebhookPyApi {{ createWebhook(data:{{{project}topics:{{set:[{}]}}, url:{}, secret:{}}}){{{FIELDS}}} }}",
        want.topics.join(" "),
        literal(&want.url),
        literal(want.secret.expose_secret()),
    );
    #[derive(Deserialize)]
    struct Created {
        #[serde(rename = "createWebhook")]
        hook: Webhook,
    }
    let created: Created = api.call("creating a webhook", &query, Value::Null).await?;
    Ok(created.hook)
}

/// Updates one webhook's topics, URL or status (the secret cannot be).
async fn update(api: &Api, id: &str, fields: &[String]) -> Result<Webhook, LabelboxError> {
    let query = format!(
        "mutation UpdateWebhookPyApi {{ updateWebhook(where: {{id: {}}} data:{{{}}}){{{FIELDS}}} }}",
        literal(id),
        fields.join(", ")
    );
    #[derive(Deserialize)]
    struct Updated {
        #[serde(rename = "updateWebhook")]
        hook: Webhook,
    }
    let updated: Updated = api.call("updating a webhook", &query, Value::Null).await?;
    Ok(updated.hook)
}

/// `labelhook labelbox webhooks list`.
pub fn render_list(
    out: &mut dyn std::io::Write,
    existing: &[Webhook],
    steps: &[Step],
    ours: &Ours,
) -> std::io::Result<()> {
    let wanted_ids: HashSet<&str> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Update { id, .. } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    let retired: HashSet<&str> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Retire { id } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    let scope_width = existing
        .iter()
        .map(|h| h.scope.to_string().len())
        .fold(12, usize::max);
    let id_width = existing.iter().map(|h| h.id.len()).fold(2, usize::max);
    writeln!(
        out,
        "{:<id_width$}  {:<8}  {:<scope_width$}  {:<4}  {:<6}  {:<60}  URL",
        "ID", "STATUS", "SCOPE", "OURS", "WANTED", "TOPICS"
    )?;
    for hook in existing {
        let mine = ours.contains(hook);
        let wanted = if !mine {
            "-"
        } else if retired.contains(hook.id.as_str()) {
            "no"
        } else if hook.status == ACTIVE || wanted_ids.contains(hook.id.as_str()) {
            "yes"
        } else {
            "no"
        };
        writeln!(
            out,
            "{:<id_width$}  {:<8}  {:<scope_width$}  {:<4}  {:<6}  {:<60}  {}",
            hook.id,
            hook.status,
            hook.scope,
            if mine { "yes" } else { "no" },
            wanted,
            hook.topics.join(","),
            hook.url
        )?;
    }
    let missing = steps
        .iter()
        .filter(|s| matches!(s, Step::Create { .. }))
        .count();
    if missing > 0 {
        writeln!(
            out,
            "{missing} webhook(s) the configuration wants do not exist yet: \
             `labelhook labelbox webhooks apply` creates them"
        )?;
    }
    Ok(())
}

/// The plan, as `apply` prints it before doing it.
pub fn render_plan(
    out: &mut dyn std::io::Write,
    steps: &[Step],
    wanted: &[Wanted],
    existing: &[Webhook],
) -> std::io::Result<()> {
    let count = |f: fn(&Step) -> bool| steps.iter().filter(|s| f(s)).count();
    writeln!(
        out,
        "Labelbox webhooks: {} to create, {} to update, {} to retire",
        count(|s| matches!(s, Step::Create { .. })),
        count(|s| matches!(s, Step::Update { .. })),
        count(|s| matches!(s, Step::Retire { .. })),
    )?;
    for step in steps {
        match step {
            Step::Create { wanted: w } => {
                let want = &wanted[*w];
                writeln!(
                    out,
                    "  + create  {}  {}  {}  (endpoint {:?}, secret {})",
                    want.scope,
                    want.topics.join(","),
                    want.url,
                    want.endpoint,
                    want.secret_index
                )?;
            }
            Step::Update {
                id,
                topics,
                url,
                activate,
                ..
            } => {
                let hook = existing.iter().find(|h| &h.id == id);
                let mut changes = Vec::new();
                if *activate {
                    changes.push(format!("status {INACTIVE} -> {ACTIVE}"));
                }
                if let Some(topics) = topics {
                    let before = hook.map(|h| h.topics.join(",")).unwrap_or_default();
                    changes.push(format!("topics {before} -> {}", topics.join(",")));
                }
                if let Some(url) = url {
                    let before = hook.map(|h| h.url.as_str()).unwrap_or_default();
                    changes.push(format!("url {before} -> {url}"));
                }
                let scope = hook.map(|h| h.scope.to_string()).unwrap_or_default();
                writeln!(out, "  ~ update  {id}  {scope}  {}", changes.join("; "))?;
            }
            Step::Retire { id } => {
                let hook = existing.iter().find(|h| &h.id == id);
                writeln!(
                    out,
                    "  - retire  {id}  {}  {}  (set {INACTIVE}: the configuration no longer wants it)",
                    hook.map(|h| h.scope.to_string()).unwrap_or_default(),
                    hook.map(|h| h.url.as_str()).unwrap_or_default()
                )?;
            }
        }
    }
    Ok(())
}

/// Carries out `steps`: creates and updates first; the retirements only once every one of
/// them succeeded and each new webhook is ACTIVE, so that Labelbox always has a webhook to
/// call (a rotation's old webhook is retired after the new one is active).
pub async fn carry_out(
    api: &Api,
    out: &mut dyn std::io::Write,
    steps: &[Step],
    wanted: &[Wanted],
) -> Result<Outcome, LabelboxError> {
    if steps.is_empty() {
        return Ok(Outcome::NothingToDo);
    }
    for step in steps {
        match step {
            Step::Create { wanted: w } => {
                let hook = create(api, &wanted[*w]).await?;
                writeln!(out, "created {} ({})", hook.id, hook.status)?;
                if hook.status != ACTIVE {
                    return Err(LabelboxError::NotActive(hook.id));
                }
            }
            Step::Update {
                id,
                topics,
                url,
                activate,
                ..
            } => {
                let mut fields = Vec::new();
                if let Some(topics) = topics {
                    fields.push(format!("topics: {{set: [{}]}}", topics.join(" ")));
                }
                if let Some(url) = url {
                    fields.push(format!("url: {}", literal(url)));
                }
                if *activate {
                    fields.push(format!("status: {ACTIVE}"));
                }
                let hook = update(api, id, &fields).await?;
                writeln!(out, "updated {} ({})", hook.id, hook.status)?;
            }
            Step::Retire { .. } => {}
        }
    }
    for step in steps {
        if let Step::Retire { id } = step {
            let hook = update(api, id, &[format!("status: {INACTIVE}")]).await?;
            writeln!(out, "retired {} ({})", hook.id, hook.status)?;
        }
    }
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(id: &str, status: &str, scope: Scope, topics: &[&str], url: &str) -> Webhook {
        Webhook {
            id: id.to_owned(),
            status: status.to_owned(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            url: url.to_owned(),
            scope,
        }
    }

    fn want(scope: Scope, topics: &[&str], url: &str, secret: &str) -> Wanted {
        let secret = SecretString::from(secret.to_owned());
        let id = secret_id(&secret);
        Wanted {
            scope,
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            url: with_secret_id(url, &id),
            secret_id: id,
            endpoint: "labelbox".to_owned(),
            secret_index: 0,
            secret,
        }
    }

    fn ours(urls: &[&str], secrets: &[&str]) -> Ours {
        Ours {
            urls: urls.iter().map(|u| split_secret_id(u).0).collect(),
            secret_ids: secrets
                .iter()
                .map(|s| secret_id(&SecretString::from((*s).to_owned())))
                .collect(),
        }
    }

    const URL: &str = "https://hooks.example.com/webhooks/labelbox";

    #[test]
    fn the_secret_id_goes_in_and_out_of_a_url_and_names_no_secret() {
        let secret = SecretString::from("s3cret-value".to_owned());
        let id = secret_id(&secret);
        assert_eq!(id.len(), 12);
        assert!(!id.contains("s3cret"));
        let url = with_secret_id("https://h.example/webhooks/x?a=1", &id);
        assert_eq!(
            split_secret_id(&url),
            ("https://h.example/webhooks/x?a=1".to_owned(), Some(id))
        );
        assert_eq!(split_secret_id(URL), (URL.to_owned(), None));
    }

    #[test]
    fn a_missing_webhook_is_created_and_a_matching_one_left_alone() {
        let p = Scope::Project("p1".to_owned());
        let wanted = [want(p.clone(), &["LABEL_CREATED"], URL, "new")];
        let ours = ours(&[URL], &["new"]);
        assert_eq!(plan(&wanted, &[], &ours), vec![Step::Create { wanted: 0 }]);
        let same = hook("w1", ACTIVE, p, &["LABEL_CREATED"], &wanted[0].url);
        assert!(plan(&wanted, &[same], &ours).is_empty());
    }

    #[test]
    fn topics_and_a_moved_url_are_updated_in_place() {
        let p = Scope::Project("p1".to_owned());
        let wanted = [want(
            p.clone(),
            &["LABEL_CREATED", "LABEL_UPDATED"],
            URL,
            "s",
        )];
        let old_host = with_secret_id(
            "https://old.example.com/webhooks/labelbox",
            &wanted[0].secret_id,
        );
        let ours = ours(&[URL], &["s"]);
        let existing = [hook("w1", ACTIVE, p, &["LABEL_CREATED"], &old_host)];
        assert_eq!(
            plan(&wanted, &existing, &ours),
            vec![Step::Update {
                id: "w1".to_owned(),
                wanted: 0,
                topics: Some(vec!["LABEL_CREATED".to_owned(), "LABEL_UPDATED".to_owned()]),
                url: Some(wanted[0].url.clone()),
                activate: false,
            }]
        );
    }

    #[test]
    fn a_new_secret_means_a_new_webhook_and_the_old_one_retired() {
        let p = Scope::Project("p1".to_owned());
        let wanted = [want(p.clone(), &["LABEL_CREATED"], URL, "new")];
        let old = want(p.clone(), &["LABEL_CREATED"], URL, "old");
        let ours = ours(&[URL], &["old", "new"]);
        let existing = [hook("w-old", ACTIVE, p, &["LABEL_CREATED"], &old.url)];
        assert_eq!(
            plan(&wanted, &existing, &ours),
            vec![
                Step::Create { wanted: 0 },
                Step::Retire {
                    id: "w-old".to_owned()
                }
            ]
        );
    }

    #[test]
    fn what_is_not_ours_is_never_touched_and_inactive_ones_are_reused() {
        let p = Scope::Project("p1".to_owned());
        let wanted = [want(p.clone(), &["LABEL_CREATED"], URL, "s")];
        let ours = ours(&[URL], &["s"]);
        let existing = [
            hook(
                "theirs",
                ACTIVE,
                p.clone(),
                &["LABEL_CREATED"],
                "https://other.example/x",
            ),
            hook("dormant", INACTIVE, p, &["LABEL_CREATED"], &wanted[0].url),
            hook(
                "other-scope",
                ACTIVE,
                Scope::Organization,
                &["LABEL_CREATED"],
                URL,
            ),
        ];
        assert_eq!(
            plan(&wanted, &existing, &ours),
            vec![
                Step::Update {
                    id: "dormant".to_owned(),
                    wanted: 0,
                    topics: None,
                    url: None,
                    activate: true,
                },
                Step::Retire {
                    id: "other-scope".to_owned()
                }
            ]
        );
    }

    #[test]
    fn strings_spliced_into_a_mutation_are_escaped() {
        assert_eq!(literal(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(literal("line\nbreak"), r#""line\nbreak""#);
    }
}
