//! The checks and secrets of `[labelbox]` that look beyond it: the `[[endpoint]]` each
//! `[[labelbox.webhook]]` signs with, the API key and the endpoints' secrets, which only the
//! `labelbox` commands resolve (a server's environment need not hold the key).

use std::collections::HashMap;

use secrecy::SecretString;

use super::{ConfigError, Problem, Settings};

impl Settings {
    /// `labelbox.api_key`, resolved: for the `labelbox` commands only.
    pub fn labelbox_api_key(
        &self,
        env: &HashMap<String, String>,
    ) -> Result<SecretString, ConfigError> {
        let invalid =
            |key: String, message: String| ConfigError::Invalid(vec![Problem { key, message }]);
        let Some(source) = self.labelbox.as_ref().and_then(|l| l.api_key.as_ref()) else {
            return Err(invalid(
                "labelbox.api_key".to_owned(),
                "is required by the `labelbox` commands, e.g. api_key = { env = \
                 \"LABELBOX_API_KEY\" } (Workspace settings → API keys)"
                    .to_owned(),
            ));
        };
        source
            .resolve(env)
            .map_err(|(suffix, message)| invalid(format!("labelbox.api_key{suffix}"), message))
    }

    /// Every `[[endpoint]]`'s secrets, resolved, by endpoint name: for `labelbox webhooks`,
    /// which creates webhooks with them and recognises ours by them (the other secrets of the
    /// file are not needed, so not asked for).
    pub fn endpoint_secrets(
        &self,
        env: &HashMap<String, String>,
    ) -> Result<HashMap<String, Vec<SecretString>>, ConfigError> {
        let mut problems = Vec::new();
        let mut found = HashMap::new();
        for (i, endpoint) in self.endpoint.iter().enumerate() {
            let mut secrets = Vec::new();
            for (j, source) in endpoint.secrets.iter().enumerate() {
                match source.resolve(env) {
                    Ok(secret) => secrets.push(secret),
                    Err((suffix, message)) => problems.push(Problem {
                        key: format!("endpoint[{i}].secrets[{j}]{suffix}"),
                        message,
                    }),
                }
            }
            found.insert(endpoint.name.clone(), secrets);
        }
        if problems.is_empty() {
            Ok(found)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The checks of `[labelbox]`: its own, and that each webhook names an `[[endpoint]]`
    /// and one of its secrets.
    pub(super) fn validate_labelbox(&self, problems: &mut Vec<Problem>) {
        let Some(lb) = &self.labelbox else { return };
        lb.check(problems);
        for (i, hook) in lb.webhook.iter().enumerate() {
            let key = |name: &str| format!("labelbox.webhook[{i}].{name}");
            let mut problem =
                |key: String, message: String| problems.push(Problem { key, message });
            match self.endpoint.iter().find(|e| e.name == hook.endpoint) {
                None => problem(
                    key("endpoint"),
                    format!("no [[endpoint]] is named {:?}", hook.endpoint),
                ),
                Some(endpoint) => {
                    if hook.secret.is_some_and(|s| s >= endpoint.secrets.len()) {
                        problem(
                            key("secret"),
                            format!(
                                "endpoint {:?} has {} secret(s), counted from 0",
                                endpoint.name,
                                endpoint.secrets.len()
                            ),
                        );
                    }
                }
            }
        }
    }
}
