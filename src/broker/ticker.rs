//! The engine's timers (delays, visibility, retention, dead letters) for queues nobody touches.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Broker;
use crate::limits::broker::TICK_INTERVAL;

/// Advances the timers every [`TICK_INTERVAL`] until `shutdown`.
pub(super) async fn run(broker: Arc<Broker>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(TICK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => return,
        }
        broker.tick();
    }
}

impl Broker {
    /// Advances the engine's timers to now and records what they moved (dead letters); nobody
    /// waits on that commit. Does nothing while the storage refuses changes: timers wait until
    /// it accepts them again (they are not lost).
    pub fn tick(&self) {
        let mut out = Vec::new();
        // Held from the engine call to the append (see `storage`), never across an await.
        let _order = self.storage.order();
        if self.storage.refusal().is_some() {
            return;
        }
        self.engine.tick(self.clock.now_ms(), &mut out);
        if !out.is_empty() {
            let _ = self.storage.append(out);
        }
    }
}
