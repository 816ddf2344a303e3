//! ACME HTTP-01 answers (RFC 8555 §8.3), on plain listeners.
//!
//! `acme` puts the key authorization of each pending challenge here by
//! token; a plain listener of a process that has an `http-01` ACME
//! section answers `GET /.well-known/acme-challenge/{token}` from it
//! itself: such requests never reach a backend (an unknown token is a
//! 404). Listeners of a process without one forward those paths as any
//! other.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::ProxyBody;

/// Key authorizations by token, shared by `acme` and the listeners.
pub type Http01Answers = Arc<ArcSwap<HashMap<String, String>>>;

const PREFIX: &str = "/.well-known/acme-challenge/";

/// The answer to `req` when it asks for an HTTP-01 challenge, else `None`.
pub fn answer<B>(req: &Request<B>, answers: &Http01Answers) -> Option<Response<ProxyBody>> {
    let token = req.uri().path().strip_prefix(PREFIX)?;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Some(super::status(
            StatusCode::METHOD_NOT_ALLOWED,
            "ACME challenges are fetched with GET\n",
        ));
    }
    let Some(key_auth) = answers.load().get(token).cloned() else {
        return Some(super::status(
            StatusCode::NOT_FOUND,
            "no such ACME challenge\n",
        ));
    };
    let mut resp = Response::new(ProxyBody::text(key_auth));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn answers() -> Http01Answers {
        let answers = Http01Answers::default();
        answers.store(Arc::new(HashMap::from([(
            "tok-1".to_string(),
            "tok-1.thumb".to_string(),
        )])));
        answers
    }

    fn get(method: Method, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .expect("request")
    }

    #[tokio::test]
    async fn a_known_token_is_answered_with_its_key_authorization() {
        let resp = answer(
            &get(Method::GET, "/.well-known/acme-challenge/tok-1"),
            &answers(),
        )
        .expect("answered");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"tok-1.thumb");
    }

    #[test]
    fn unknown_tokens_and_other_methods_are_refused_here_and_other_paths_pass() {
        let a = answers();
        let status = |m, p| answer(&get(m, p), &a).map(|r| r.status());
        assert_eq!(
            status(Method::GET, "/.well-known/acme-challenge/other"),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            status(Method::GET, "/.well-known/acme-challenge/"),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            status(Method::POST, "/.well-known/acme-challenge/tok-1"),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            status(Method::HEAD, "/.well-known/acme-challenge/tok-1"),
            Some(StatusCode::OK)
        );
        assert_eq!(status(Method::GET, "/.well-known/other"), None);
        assert_eq!(
            status(Method::GET, "/chat?x=/.well-known/acme-challenge/tok-1"),
            None
        );
    }
}
