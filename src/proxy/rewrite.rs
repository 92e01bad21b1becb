//! `rewrite`: a regular expression (the `regex` crate: RE2 semantics, linear time) applied to
//! the normalised path after routing; the result is normalised again.

/// A route's rewrite, compiled by the compile step.
#[derive(Debug, Clone)]
pub struct RewriteRt {
    pub regex: regex::Regex,
    pub replacement: String,
}

impl RewriteRt {
    /// Compiles `regex`; the replacement's capture references must name groups it has.
    pub fn compile(regex: &str, replacement: &str) -> Result<RewriteRt, String> {
        let regex = regex::Regex::new(regex).map_err(|e| e.to_string())?;
        Ok(RewriteRt {
            regex,
            replacement: replacement.to_string(),
        })
    }
}
