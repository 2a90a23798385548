//! Checks of `FollowUp`.

use super::BodyContext;
use super::check::{
    Check, at, count, date_optional, date_required, enum_optional, enum_required, enum_set, fail,
    not_future, nth,
};
use super::common::{contact, notes};
use crate::pb;

const ROOT: &str = "follow_up";

/// Most events of one follow-up.
const MAX_EVENTS: usize = 32;
/// Most progress entries (one per dimension).
const MAX_PROGRESS: usize = 7;

/// A `FollowUp`.
pub(super) fn follow_up(f: &pb::FollowUp, ctx: &BodyContext) -> Check {
    let stage: pb::FollowUpStage = enum_required(f.stage, &at(ROOT, "stage"))?;
    let reported_path = at(ROOT, "reported_on");
    let reported_on = date_required(&f.reported_on, &reported_path)?;
    not_future(reported_on, ctx.today, &reported_path)?;

    let events_path = at(ROOT, "events");
    count(f.events.len(), &events_path, 0, MAX_EVENTS)?;
    for (i, event) in f.events.iter().enumerate() {
        let path = nth(&events_path, i);
        let kind: pb::FollowUpEventType = enum_required(event.r#type, &at(&path, "type"))?;
        let occurred_path = at(&path, "occurred_on");
        if let Some(occurred) = date_optional(&event.occurred_on, &occurred_path)?
            && occurred > reported_on
        {
            return fail(occurred_path, "must not be after reported_on");
        }
        let needs_services = matches!(
            kind,
            pb::FollowUpEventType::ServicesStarted | pb::FollowUpEventType::ServiceCompleted
        );
        let services_path = at(&path, "services");
        let _: Vec<pb::ServiceType> =
            enum_set(&event.services, &services_path, usize::from(needs_services)).map_err(
                |e| {
                    if needs_services && event.services.is_empty() {
                        crate::ValidationError::new(
                            services_path.clone(),
                            "must have at least one entry for services started or completed",
                        )
                    } else {
                        e
                    }
                },
            )?;
    }

    let progress_path = at(ROOT, "progress");
    count(f.progress.len(), &progress_path, 0, MAX_PROGRESS)?;
    for (i, progress) in f.progress.iter().enumerate() {
        let path = nth(&progress_path, i);
        let dimension_path = at(&path, "dimension");
        let _: pb::ReintegrationDimension = enum_required(progress.dimension, &dimension_path)?;
        if f.progress[..i]
            .iter()
            .any(|p| p.dimension == progress.dimension)
        {
            return fail(dimension_path, "must not repeat a dimension");
        }
        let _: pb::ProgressStatus = enum_required(progress.status, &at(&path, "status"))?;
    }

    let closing = stage == pb::FollowUpStage::Closure;
    let due_path = at(ROOT, "next_follow_up_due");
    let due = date_optional(&f.next_follow_up_due, &due_path)?;
    match due {
        Some(_) if closing => {
            return fail(due_path, "must be empty when the stage is closure");
        }
        Some(due) if due <= reported_on => {
            return fail(due_path, "must be after reported_on");
        }
        _ => {}
    }
    let reason_path = at(ROOT, "closure_reason");
    let reason: Option<pb::ClosureReason> = enum_optional(f.closure_reason, &reason_path)?;
    match (closing, reason) {
        (true, None) => return fail(reason_path, "is required when the stage is closure"),
        (false, Some(_)) => {
            return fail(reason_path, "must be unset unless the stage is closure");
        }
        _ => {}
    }
    if let Some(c) = &f.contact {
        contact(c, &at(ROOT, "contact"))?;
    }
    notes(f.notes.as_ref(), &at(ROOT, "notes"))
}
