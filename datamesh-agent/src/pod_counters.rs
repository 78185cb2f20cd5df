//! The proxy's per-pod counts into the pinned `dm_pod_counters` map (the proxy's
//! [`PodDirectory`]): pod names from discovery, and every flush's command and throttled
//! deltas added to the pod's entry, so `datamesh-agent pods` and `bpftool map dump` show them.
//!
//! The flush is a read-modify-write of the whole map value (the bpf syscall has no per-field
//! update): an eBPF atomic add landing between our read and our write is lost. The window is a
//! few microseconds every 200 ms per active pod; we accept that small race on the eBPF-side
//! counters rather than split the value (which would change the map ABI).

use std::path::Path;
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap as BpfHashMap, MapData};
use datamesh_common::{PodCounters, MAP_POD_COUNTERS};
use datamesh_proxy::accounting::PodDirectory;
use tracing::warn;

use crate::dataplane::{self, DataplaneError};
use crate::pods::Pods;

type CountersMap = BpfHashMap<MapData, u64, PodCounters>;

pub struct MapDirectory {
    pods: Arc<Pods>,
    counters: Mutex<CountersMap>,
}

impl MapDirectory {
    /// Opens `dm_pod_counters` under `pin_dir`.
    pub fn open(pin_dir: &Path, pods: Arc<Pods>) -> Result<Self, DataplaneError> {
        Ok(Self {
            pods,
            counters: Mutex::new(dataplane::open_typed::<CountersMap>(
                pin_dir,
                MAP_POD_COUNTERS,
            )?),
        })
    }
}

impl PodDirectory for MapDirectory {
    fn name_of(&self, pod: u64) -> Option<String> {
        self.pods.name_of(pod)
    }

    fn add_counts(&self, pod: u64, commands: u64, throttled: u64) {
        let mut m = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let mut v = m.get(&pod, 0).unwrap_or_default();
        v.commands = v.commands.saturating_add(commands);
        v.commands_throttled = v.commands_throttled.saturating_add(throttled);
        if let Err(e) = m.insert(pod, v, 0) {
            warn!(cookie = pod, error = %e, "cannot write {MAP_POD_COUNTERS}");
        }
    }
}
