//! A deployment's events: what happened to it, as a kind people and Kubernetes read (the
//! event's `reason`) and a message with the numbers. Kept in the state (the last
//! `MAX_EVENTS`), shown by `gantry get`, and published as Kubernetes Events by the operator.

use gantry_proto::v1 as pb;

use super::state::{MAX_EVENTS, State};
use crate::clock::unix_ms;

/// What happened to a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Updated,
    Scaled,
    /// The autoscaler changed the replica count (the message has the signal and the target).
    Autoscaled,
    /// A replica was given GPUs.
    Placed,
    /// A replica cannot be placed now (the message says why).
    Pending,
    /// A returning worker still held a replica, which was kept.
    Adopted,
    /// One stage of a split replica loaded.
    StageLoaded,
    /// A replica is ready.
    Loaded,
    LoadFailed,
    WorkerLost,
}

impl EventKind {
    pub const ALL: [EventKind; 11] = [
        EventKind::Created,
        EventKind::Updated,
        EventKind::Scaled,
        EventKind::Autoscaled,
        EventKind::Placed,
        EventKind::Pending,
        EventKind::Adopted,
        EventKind::StageLoaded,
        EventKind::Loaded,
        EventKind::LoadFailed,
        EventKind::WorkerLost,
    ];

    /// The name events carry (`LoadFailed`); Kubernetes shows it as the event's reason.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "Created",
            EventKind::Updated => "Updated",
            EventKind::Scaled => "Scaled",
            EventKind::Autoscaled => "Autoscaled",
            EventKind::Placed => "Placed",
            EventKind::Pending => "Pending",
            EventKind::Adopted => "Adopted",
            EventKind::StageLoaded => "StageLoaded",
            EventKind::Loaded => "Loaded",
            EventKind::LoadFailed => "LoadFailed",
            EventKind::WorkerLost => "WorkerLost",
        }
    }

    /// The kind an event record names, if it is one.
    pub fn from_name(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether it means something went wrong (a Kubernetes `Warning`).
    pub fn is_warning(self) -> bool {
        matches!(self, EventKind::Pending | EventKind::LoadFailed | EventKind::WorkerLost)
    }
}

impl State {
    /// Records an event of deployment `name`; the same message again (a pending reason checked
    /// again) is not a new event.
    pub fn event(&mut self, name: &str, kind: EventKind, message: String) {
        let Some(d) = self.deployments.get_mut(name) else { return };
        if d.events.back().is_some_and(|e| e.kind == kind.as_str() && e.message == message) {
            return;
        }
        // Strictly increasing per deployment, so "published up to T" names each event once.
        let at_ms = d.events.back().map_or(0, |e| e.at_ms + 1).max(unix_ms());
        d.events.push_back(pb::DeploymentEventRecord { at_ms, kind: kind.as_str().into(), message });
        while d.events.len() > MAX_EVENTS {
            d.events.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_warnings_are_the_failures() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_name(k.as_str()), Some(k));
        }
        assert_eq!(EventKind::from_name("Unschedulable"), None);
        let warnings: Vec<&str> =
            EventKind::ALL.into_iter().filter(|k| k.is_warning()).map(EventKind::as_str).collect();
        assert_eq!(warnings, ["Pending", "LoadFailed", "WorkerLost"]);
    }
}
