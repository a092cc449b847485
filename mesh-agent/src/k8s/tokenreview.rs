//! The CA's check of a node agent's credential in a cluster: a projected,
//! audience-bound service-account token, verified by the API server with a
//! TokenReview. The token must be
//!
//! - authenticated for the CA's audience (a token minted for anything else,
//!   such as the API server itself, is refused);
//! - the agent DaemonSet's service account (`system:serviceaccount:NS:NAME`);
//! - bound to a pod, whose node the API server names in the review
//!   (`authentication.kubernetes.io/node-name`, Kubernetes >= 1.30): that
//!   node is the caller's, and it may obtain certificates only for the pods
//!   the API places there.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};

/// The node a bound token's pod runs on, in the TokenReview's `user.extra`.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
pub const DEFAULT_AUDIENCE: &str = "nodemesh-ca";

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the token was not accepted by the Kubernetes API: {0}")]
    NotAuthenticated(String),
    #[error("the token belongs to {0:?}, not to the node agents' service account {1:?}")]
    WrongAccount(String, String),
    #[error(
        "the token is not bound to a pod on a node (no {NODE_NAME_EXTRA} in the review): mount a projected service-account token (Kubernetes >= 1.30)"
    )]
    NoNode,
    #[error("cannot review the token: the CA's service account may not create tokenreviews (API group \"authentication.k8s.io\"); grant `create` on tokenreviews in its ClusterRole. API server said: {0}")]
    Forbidden(String),
    #[error("cannot review the token: {0}")]
    Api(String),
}

pub struct TokenReviewer {
    client: Client,
    audience: String,
    /// `system:serviceaccount:<ns>:<name>`.
    username: String,
}

impl TokenReviewer {
    /// `agent_account` is `namespace/name` of the agents' service account.
    pub fn new(client: Client, audience: impl Into<String>, agent_account: &str) -> Result<Self, String> {
        let (ns, name) = agent_account
            .split_once('/')
            .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains('/'))
            .ok_or_else(|| format!("{agent_account:?} is not NAMESPACE/NAME"))?;
        Ok(Self {
            client,
            audience: audience.into(),
            username: format!("system:serviceaccount:{ns}:{name}"),
        })
    }

    /// The node the token's holder runs on.
    pub async fn node_of(&self, token: &str) -> Result<String, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let done = match api.create(&PostParams::default(), &review).await {
            Ok(r) => r,
            Err(kube::Error::Api(s)) if s.code == 403 => return Err(ReviewError::Forbidden(s.message.clone())),
            Err(e) => return Err(ReviewError::Api(crate::error_chain(&e))),
        };
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(ReviewError::NotAuthenticated(status.error.unwrap_or_else(|| "not authenticated".into())));
        }
        // The API server echoes the audiences the token is valid for; one must be ours.
        if !status.audiences.as_ref().is_some_and(|a| a.contains(&self.audience)) {
            return Err(ReviewError::NotAuthenticated(format!("the token is not for the audience {:?}", self.audience)));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.username {
            return Err(ReviewError::WrongAccount(username, self.username.clone()));
        }
        user.extra
            .as_ref()
            .and_then(|e| e.get(NODE_NAME_EXTRA))
            .and_then(|v| v.first())
            .filter(|n| !n.is_empty())
            .cloned()
            .ok_or(ReviewError::NoNode)
    }
}
