//! The header-field policy for requests, applied once before anything reads the headers, the
//! same for HTTP/1 and HTTP/2:
//! - at most `maxHeaderCount` fields and `maxHeaderSize` bytes of fields (each field counted as
//!   `name: value\r\n`, i.e. name + value + 4 bytes), else 431;
//! - names containing `_` are dropped (default), refused, or allowed (`underscoreHeaders`):
//!   CGI, WSGI and PHP map `X_Consumer_Id` and `X-Consumer-Id` to the same variable, so a name
//!   with `_` can impersonate a gateway-set header or smuggle `Transfer_Encoding`;
//! - more than one `Authorization` field is refused (which one would be checked and which one
//!   would a backend read?).

use http::header::{HeaderMap, HeaderName, AUTHORIZATION};

/// What to do with request header names containing `_` (`underscoreHeaders`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum UnderscoreHeaders {
    /// Removed before the request is looked at (nginx's `underscores_in_headers off`).
    #[default]
    Drop,
    /// 400.
    Reject,
    /// Kept and forwarded.
    Allow,
}

/// The limits and choices of the policy.
#[derive(Debug, Clone, Copy)]
pub struct HeaderPolicy {
    pub max_count: usize,
    pub max_bytes: u64,
    pub underscores: UnderscoreHeaders,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("more than {0} header fields (maxHeaderCount)")]
    TooMany(usize),
    #[error("header fields larger than {0} bytes (maxHeaderSize)")]
    TooLarge(u64),
    #[error("header name with '_' refused (underscoreHeaders: reject)")]
    Underscore,
    #[error("more than one Authorization header")]
    DuplicateAuthorization,
}

impl HeaderError {
    /// 431 for the size limits, 400 for the rest.
    pub fn is_too_large(&self) -> bool {
        matches!(self, HeaderError::TooMany(_) | HeaderError::TooLarge(_))
    }
}

impl HeaderPolicy {
    /// Applies the policy in place (dropping names with `_` under the default). One pass over
    /// the fields; the removal pass runs only when such a name is present.
    pub fn apply(&self, headers: &mut HeaderMap) -> Result<(), HeaderError> {
        if headers.len() > self.max_count {
            return Err(HeaderError::TooMany(self.max_count));
        }
        let mut bytes = 0u64;
        let mut underscore = false;
        let mut authorization = 0usize;
        for (name, value) in headers.iter() {
            let n = name.as_str();
            bytes += (n.len() + value.len() + 4) as u64;
            underscore |= n.as_bytes().contains(&b'_');
            authorization += usize::from(name == AUTHORIZATION);
        }
        if bytes > self.max_bytes {
            return Err(HeaderError::TooLarge(self.max_bytes));
        }
        if authorization > 1 {
            return Err(HeaderError::DuplicateAuthorization);
        }
        if underscore {
            match self.underscores {
                UnderscoreHeaders::Allow => {}
                UnderscoreHeaders::Reject => return Err(HeaderError::Underscore),
                UnderscoreHeaders::Drop => {
                    let names: Vec<HeaderName> = headers
                        .keys()
                        .filter(|n| n.as_str().as_bytes().contains(&b'_'))
                        .cloned()
                        .collect();
                    for n in names {
                        headers.remove(n);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether a header name may reach a backend under `policy` (for properties and tests).
pub fn name_allowed(name: &str, policy: UnderscoreHeaders) -> bool {
    policy == UnderscoreHeaders::Allow || !name.contains('_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(u: UnderscoreHeaders) -> HeaderPolicy {
        HeaderPolicy {
            max_count: 5,
            max_bytes: 200,
            underscores: u,
        }
    }

    fn map(fields: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in fields {
            m.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn underscores() {
        let fields = [
            ("x_consumer_id", "admin"),
            ("transfer_encoding", "chunked"),
            ("a", "1"),
        ];
        let mut m = map(&fields);
        policy(UnderscoreHeaders::Drop).apply(&mut m).unwrap();
        assert_eq!(m.len(), 1);
        assert!(m.contains_key("a"));
        let mut m = map(&fields);
        assert_eq!(
            policy(UnderscoreHeaders::Reject).apply(&mut m),
            Err(HeaderError::Underscore)
        );
        let mut m = map(&fields);
        policy(UnderscoreHeaders::Allow).apply(&mut m).unwrap();
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn limits_hold_at_their_value() {
        let p = policy(UnderscoreHeaders::Drop);
        let five: Vec<(String, String)> = (0..5).map(|i| (format!("h{i}"), "v".into())).collect();
        let refs: Vec<(&str, &str)> = five.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert!(p.apply(&mut map(&refs)).is_ok());
        let mut six = map(&refs);
        six.append("h5", "v".parse().unwrap());
        assert_eq!(p.apply(&mut six), Err(HeaderError::TooMany(5)));
        // 200 bytes exactly passes; 201 does not ("a: " + value + "\r\n").
        let v = "x".repeat(200 - 1 - 4);
        assert!(p.apply(&mut map(&[("a", &v)])).is_ok());
        let v = "x".repeat(200 - 1 - 4 + 1);
        assert_eq!(
            p.apply(&mut map(&[("a", &v)])),
            Err(HeaderError::TooLarge(200))
        );
    }

    #[test]
    fn two_authorization_fields_refused() {
        let p = policy(UnderscoreHeaders::Drop);
        let mut m = map(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]);
        assert_eq!(p.apply(&mut m), Err(HeaderError::DuplicateAuthorization));
    }
}
