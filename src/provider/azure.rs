//! Azure OpenAI: the OpenAI dialect, so the OpenAI passthrough; only the URL and the credential
//! differ (<https://learn.microsoft.com/azure/ai-foundry/openai/reference>).
//!
//! - `api_version = "YYYY-MM-DD[-preview]"`: the deployment is a path segment,
//!   `{api_base}/openai/deployments/{deployment}/chat/completions?api-version=...` (and
//!   `/completions`, `/embeddings`); the deployment is the target's upstream model. A name from
//!   the client (`azure.*` routes) reaches the path only when it is a plain deployment name
//!   (ASCII letters, digits, `.`, `-`, `_`, `:`, starting with a letter or digit): nothing a client
//!   sends can add a path segment, a query or another host.
//! - `api_version = "v1"`: the v1 API, `{api_base}/openai/v1/chat/completions`, with the
//!   deployment as the body's `model`: exactly the OpenAI passthrough at another base URL.
//!
//! The key goes in the `api-key` header, never in a Bearer header. Azure's streams open with a
//! chunk whose `choices` is empty and which carries `prompt_filter_results`, and content-filter
//! annotations ride on later chunks: the passthrough forwards them as they are (only an event
//! with an empty `choices` *and* a usage object counts as the usage-only event it may remove).

use super::openai;
use super::{Api, Call, Prepared, Provider};
use crate::config::{ConfigError, Connection, RawConnection, Secrets};
use crate::error::{Error, Kind};
use crate::router::Target;
use http::header::{HeaderName, HeaderValue};
use http::Uri;
use std::time::Instant;

/// An Azure OpenAI connection's own settings.
#[derive(Debug)]
pub struct Settings {
    /// The base URL as configured (for summaries).
    pub base: String,
    api: Version,
}

#[derive(Debug)]
enum Version {
    /// The dated API: the deployment in the path, `api-version` in the query.
    Dated {
        /// `{api_base}/openai/deployments/`.
        prefix: String,
        /// `?api-version=...`.
        query: String,
        stream_usage: bool,
    },
    /// The v1 API: the OpenAI passthrough at `{api_base}/openai/v1`.
    V1(Box<openai::Settings>),
}

impl Settings {
    /// Compiles `api_base` (required: the resource's URL), `api_key` (sent as `api-key`),
    /// `api_version` (required) and `stream_usage`.
    pub fn compile(
        name: &str,
        raw: &RawConnection,
        secrets: &mut Secrets<'_>,
    ) -> Result<(Provider, Vec<(HeaderName, HeaderValue)>), ConfigError> {
        let key = |k: &str| format!("connections.{name}.{k}");
        let Some(version) = &raw.api_version else {
            return Err(ConfigError(format!(
                "{}: required for azure connections: a dated API version such as \"2024-10-21\", or \"v1\"",
                key("api_version")
            )));
        };
        let version_key = format!("{}{}", key("api_version"), secrets.line(version.span()));
        let version = version.get_ref().trim();
        if version != "v1" && !is_dated_version(version) {
            return Err(ConfigError(format!(
                "{version_key}: `{}` is neither \"v1\" nor a dated API version (YYYY-MM-DD, optionally with -preview)",
                crate::error::clip(version)
            )));
        }
        if raw.api_base.is_none() {
            return Err(ConfigError(format!(
                "{}: required for azure connections: the resource's URL, https://RESOURCE.openai.azure.com",
                key("api_base")
            )));
        }
        let base = secrets.base(raw, "https://resource.openai.azure.com");
        let root = base.trim().trim_end_matches('/').to_owned();
        if root.ends_with("/openai") || root.contains("/openai/") {
            return Err(ConfigError(format!(
                "{}: give the resource's URL without `/openai...` (lmgate adds the API's path)",
                key("api_base")
            )));
        }
        // Checks the URL (scheme, host, no credentials, no query) once for every endpoint.
        crate::config::endpoint_url(&key("api_base"), &root, "/openai")?;
        let headers = secrets.key_header(raw, HeaderName::from_static("api-key"), "")?.into_iter().collect();
        let stream_usage = raw.stream_usage.unwrap_or(true);
        let api = if version == "v1" {
            Version::V1(Box::new(openai::Settings::at(&key("api_base"), format!("{root}/openai/v1"), stream_usage)?))
        } else {
            Version::Dated {
                prefix: format!("{root}/openai/deployments/"),
                query: format!("?api-version={version}"),
                stream_usage,
            }
        };
        Ok((Provider::Azure(Settings { base, api }), headers))
    }

    /// Whether `model` can name a deployment in a URL path (the dated API; v1 takes any model,
    /// in the body).
    pub fn check_model(&self, model: &str) -> Result<(), String> {
        match self.api {
            Version::V1(_) => Ok(()),
            Version::Dated { .. } => super::check_path_segment(model, "an Azure OpenAI deployment"),
        }
    }

    /// The upstream request: the OpenAI passthrough's body, sent to the deployment's URL.
    pub fn prepare(
        &self,
        conn: &Connection,
        call: &Call<'_>,
        target: &Target,
        deadline: Instant,
    ) -> Result<Prepared, Error> {
        let (prefix, query, stream_usage) = match &self.api {
            Version::V1(s) => return s.prepare(conn, call, target, deadline),
            Version::Dated { prefix, query, stream_usage } => (prefix, query, *stream_usage),
        };
        let deployment = target.upstream_model(call.model);
        self.check_model(deployment).map_err(|why| Error::invalid_request(why).param("model"))?;
        let endpoint = match call.api {
            Api::Chat => "/chat/completions",
            Api::Completions => "/completions",
            Api::Embeddings => "/embeddings",
        };
        let uri: Uri = format!("{prefix}{deployment}{endpoint}{query}")
            .parse()
            .map_err(|_| Error::upstream_failure(Kind::UpstreamUnreachable, "could not build the upstream URL"))?;
        openai::prepare_at(conn, call, target, &uri, call.stream && stream_usage, deadline)
    }
}

/// `YYYY-MM-DD` or `YYYY-MM-DD-preview`, Azure's dated API versions.
fn is_dated_version(v: &str) -> bool {
    let date = v.strip_suffix("-preview").unwrap_or(v).as_bytes();
    date.len() == 10
        && date.iter().enumerate().all(|(i, &b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dated_versions_are_checked() {
        for ok in ["2024-10-21", "2025-04-01-preview"] {
            assert!(is_dated_version(ok), "{ok}");
        }
        for bad in ["", "v2", "2024-10-2", "2024/10/21", "2024-10-21-beta", "2024-10-21&x=1", "２０２４-10-21"] {
            assert!(!is_dated_version(bad), "{bad}");
        }
    }

    #[test]
    fn only_plain_deployment_names_reach_a_path() {
        for ok in ["gpt-4o", "gpt4o-deployment", "my_dep.v2", "team:gpt-4o", "A1"] {
            assert!(super::super::is_path_segment(ok), "{ok}");
        }
        let long = "a".repeat(super::super::MAX_PATH_SEGMENT + 1);
        for bad in [
            "", ".", "..", "../x", "a/b", "a?b", "a#b", "%2e%2e", "a\r\nb", "@host", "a@host", "-x", ".x", "a b",
            "a%2fb", "é", &long,
        ] {
            assert!(!super::super::is_path_segment(bad), "{bad:?}");
        }
    }
}
