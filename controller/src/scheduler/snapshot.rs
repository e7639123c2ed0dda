//! The cluster as placement sees it: each connected worker's GPUs with their memory net of
//! what replicas have reserved.

use std::collections::HashMap;

use gantry_core::placement::{GpuView, NodeView};

use crate::cluster::state::{State, replica_model_id};

/// Each GPU of the connected workers, its free memory net of reservations. A reservation the
/// worker's last report already shows loaded is in its free memory once, not twice.
pub fn nodes(st: &State) -> Vec<NodeView> {
    // Reservations per (worker, gpu): all, and those the worker's last report does not show yet.
    let mut reserved: HashMap<(&str, u32), (u64, u64)> = HashMap::new();
    // Host memory promised to experts the worker's last report does not show loaded yet.
    let mut host: HashMap<&str, u64> = HashMap::new();
    for (name, d) in &st.deployments {
        for (&i, r) in &d.replicas {
            let Some(p) = &r.placement else { continue };
            let id = replica_model_id(name, i);
            for s in &p.stages {
                let shown = st.workers.get(&s.node).is_some_and(|w| w.holds(&id));
                let e = reserved.entry((s.node.as_str(), s.gpu)).or_default();
                e.0 += s.bytes;
                if !shown {
                    e.1 += s.bytes;
                    *host.entry(s.node.as_str()).or_default() += s.experts_on_host;
                }
            }
        }
    }
    st.workers
        .values()
        .filter(|w| !w.lost && w.connected)
        .map(|w| NodeView {
            id: w.id.clone(),
            labels: w.labels.clone(),
            gpus: w
                .status
                .gpus
                .iter()
                .map(|g| {
                    let (all, unshown) = reserved.get(&(w.id.as_str(), g.index)).copied().unwrap_or_default();
                    GpuView {
                        index: g.index,
                        name: g.name.clone(),
                        total_bytes: g.total_bytes,
                        free_bytes: g.total_bytes.saturating_sub(all).min(g.free_bytes.saturating_sub(unshown)),
                    }
                })
                .collect(),
            gpus_linked: w.status.gpus_linked,
            host_free_bytes: w
                .status
                .host_available_bytes
                .saturating_sub(host.get(w.id.as_str()).copied().unwrap_or(0)),
        })
        .collect()
}
