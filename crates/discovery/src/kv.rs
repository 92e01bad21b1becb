//! Configuration from a Consul KV key: read at start (missing or invalid is fatal), then watched
//! with blocking queries; a valid new value is applied, an invalid value or a deleted key is
//! logged and counted and the running config stays.

use std::sync::Arc;
use std::time::Duration;

use super::consul::ConsulClient;
use super::{backoff, WAIT};
use hexgate_config::{self as config, Config, ConfigErrors};

/// What a KV watch drives: the gateway's state, which applies a config (building and swapping
/// in a snapshot) and counts what failed.
pub trait ConfigTarget: Send + Sync + 'static {
    /// Applies a valid config; returns the new generation.
    fn apply(&self, config: Config) -> Result<u64, ConfigErrors>;
    /// Counts a config change that was not applied (invalid, or the key deleted).
    fn reload_failed(&self);
    /// Counts a failed Consul query.
    fn consul_error(&self);
}

/// The name config errors carry for a KV key.
pub fn source_name(key: &str) -> String {
    format!("consul:{key}")
}

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("{0}")]
    Consul(#[from] super::consul::ConsulError),
    #[error(
        "Consul key {0:?} does not exist (push a config with `hexgate config push --key {0} FILE`)"
    )]
    Missing(String),
    #[error("{0}")]
    Invalid(ConfigErrors),
}

/// Reads and validates the config stored at `key`; returns it and the index to watch from.
pub async fn load(client: &ConsulClient, key: &str) -> Result<(Config, u64), KvError> {
    let (value, index) = client.kv_get(key, 0, WAIT).await?;
    let Some((text, _)) = value else {
        return Err(KvError::Missing(key.to_string()));
    };
    let cfg = config::parse(&text, &source_name(key)).map_err(KvError::Invalid)?;
    Ok((cfg, index))
}

/// Watches `key` until the process exits, applying each valid change.
pub async fn watch<T: ConfigTarget>(
    state: Arc<T>,
    client: ConsulClient,
    key: String,
    mut index: u64,
) {
    let mut failures = 0u32;
    let mut last_text: Option<String> = None;
    loop {
        match client.kv_get(&key, index, WAIT).await {
            Ok((value, new_index)) => {
                failures = 0;
                let changed = new_index != index;
                index = if new_index < index { 0 } else { new_index };
                if !changed {
                    continue;
                }
                match value {
                    None => {
                        state.reload_failed();
                        tracing::error!(key = %key, "config key deleted from Consul; keeping the running config");
                        last_text = None;
                    }
                    Some((text, _)) => {
                        if last_text.as_deref() == Some(text.as_str()) {
                            continue;
                        }
                        let result = config::parse(&text, &source_name(&key))
                            .and_then(|cfg| state.apply(cfg));
                        match result {
                            Ok(generation) => {
                                tracing::info!(key = %key, generation, "config from Consul applied");
                            }
                            Err(errors) => {
                                state.reload_failed();
                                for e in &errors.0 {
                                    tracing::error!("config from Consul rejected, keeping the running config: {e}");
                                }
                            }
                        }
                        last_text = Some(text);
                    }
                }
            }
            Err(e) => {
                state.consul_error();
                let wait = backoff(failures);
                if failures == 0 || failures.is_power_of_two() {
                    tracing::warn!(key = %key, error = %e, retry_in = ?wait, "Consul KV watch failed; keeping the running config");
                }
                failures += 1;
                index = 0;
                tokio::time::sleep(wait).await;
            }
        }
        if index == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A line diff of `old` → `new` in unified style (`-`, `+`, and two lines of context).
pub fn diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // Longest common subsequence table (configs are small).
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] > lcs[i + 1][j]) {
            ops.push(('+', b[j]));
            j += 1;
        } else {
            ops.push(('-', a[i]));
            i += 1;
        }
    }
    let near_change = |k: usize| {
        let lo = k.saturating_sub(2);
        let hi = (k + 2).min(ops.len() - 1);
        (lo..=hi).any(|x| ops[x].0 != ' ')
    };
    let mut out = String::new();
    let mut skipped = false;
    for (k, (op, line)) in ops.iter().enumerate() {
        if *op != ' ' || near_change(k) {
            if skipped {
                out.push_str("...\n");
                skipped = false;
            }
            out.push(*op);
            out.push(' ');
            out.push_str(line);
            out.push('\n');
        } else {
            skipped = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_shows_changes_with_context() {
        let d = diff("a\nb\nc\nd\ne\nf\ng\n", "a\nb\nc\nX\ne\nf\ng\n");
        assert!(d.contains("- d\n+ X\n"), "{d}");
        assert!(d.contains("  c\n"));
        assert!(!d.contains("  a\n"), "far context is elided: {d}");
        assert_eq!(diff("same\n", "same\n"), "");
    }
}
