//! Wiring of warm pools, the ready snapshot and metrics into `kiln run`.
//!
//! `[pool.NAME]` in `kiln.toml` starts a pool for the VM type NAME for as long as the run
//! lasts; without one every session restores the image's ready snapshot (created on first
//! use), and `--cold` boots every VM instead. `--metrics-addr ADDR` serves Prometheus metrics
//! at `http://ADDR/metrics` while kiln runs.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use indexmap::IndexMap;
use kiln_runner::metrics::{self, Metrics};
use kiln_runner::pool::{PoolConfig, PoolSettings, PooledProvider, Strategy};
use kiln_vm::{VmProvider, VmSpec};
use tokio::task::JoinHandle;

use crate::config::PoolSection;

/// Defaults of a `[pool.NAME]` key left out (the design sketch's values).
const DEFAULT_MIN_IDLE: usize = 2;
const DEFAULT_MAX_TOTAL: usize = 8;

/// The checked `[pool.NAME]` sections. Runs use the `default` VM type (`runs-on` labels do not
/// select VM types yet), so only `[pool.default]` is accepted.
pub fn resolve_pools(
    sections: &IndexMap<String, PoolSection>,
    default_spec: &VmSpec,
) -> anyhow::Result<Vec<(VmSpec, PoolConfig)>> {
    let mut pools = Vec::new();
    for (name, section) in sections {
        if *name != default_spec.vm_type {
            bail!(
                "[pool.{name}]: only the `{}` VM type can have a pool in this version",
                default_spec.vm_type
            );
        }
        let strategy = match &section.strategy {
            Some(s) => s
                .parse::<Strategy>()
                .with_context(|| format!("[pool.{name}] strategy"))?,
            None => Strategy::default(),
        };
        let min_idle = section.min_idle.unwrap_or(DEFAULT_MIN_IDLE);
        let config = PoolConfig {
            min_idle,
            max_total: section.max_total.unwrap_or(DEFAULT_MAX_TOTAL.max(min_idle)),
            strategy,
        };
        config
            .validate()
            .with_context(|| format!("[pool.{name}]"))?;
        pools.push((default_spec.clone(), config));
    }
    Ok(pools)
}

/// The provider sessions allocate from: pools and the ready snapshot over `backend`, or cold
/// boots only with `cold`.
pub fn provider(
    backend: Arc<dyn VmProvider>,
    pools: Vec<(VmSpec, PoolConfig)>,
    cold: bool,
    metrics: Option<Arc<Metrics>>,
) -> anyhow::Result<Arc<PooledProvider>> {
    let settings = PoolSettings {
        snapshots: !cold,
        pools: if cold { Vec::new() } else { pools },
    };
    Ok(Arc::new(PooledProvider::new(backend, settings, metrics)?))
}

/// Starts serving `metrics` at `http://addr/metrics`.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("Cannot serve metrics on {addr}"))?;
    let bound = listener.local_addr().unwrap_or(addr);
    eprintln!("Metrics at http://{bound}/metrics");
    Ok(tokio::spawn(metrics::serve(listener, metrics)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(
        min_idle: Option<usize>,
        max_total: Option<usize>,
        strategy: Option<&str>,
    ) -> PoolSection {
        PoolSection {
            min_idle,
            max_total,
            strategy: strategy.map(str::to_owned),
        }
    }

    #[test]
    fn pool_sections_resolve_with_defaults_and_checks() {
        let spec = VmSpec::default();
        let mut sections = IndexMap::new();
        sections.insert("default".to_owned(), section(Some(1), None, Some("lru")));
        let pools = resolve_pools(&sections, &spec).expect("valid");
        assert_eq!(
            pools[0].1,
            PoolConfig {
                min_idle: 1,
                max_total: 8,
                strategy: Strategy::Lru
            }
        );
        sections.insert("default".to_owned(), section(Some(3), Some(2), None));
        let err = resolve_pools(&sections, &spec).expect_err("min above max");
        assert!(format!("{err:#}").contains("min_idle = 3"), "{err:#}");
        sections.insert("default".to_owned(), section(None, None, Some("lifo")));
        let err = resolve_pools(&sections, &spec).expect_err("bad strategy");
        assert!(format!("{err:#}").contains("lifo"), "{err:#}");
        let mut other = IndexMap::new();
        other.insert("big".to_owned(), section(None, None, None));
        let err = resolve_pools(&other, &spec).expect_err("unknown type");
        assert!(err.to_string().contains("[pool.big]"), "{err}");
    }
}
