//! Checks of `Referral` and `ReferralResponse`.

use super::BodyContext;
use super::check::{
    Check, at, countries, date_optional, date_required, enum_optional, enum_required, enum_set,
    fail, not_before, not_future, participant, present,
};
use super::common::{attachments, child, consent, contact, handling, notes, person};
use crate::pb;
use crate::time::Date;

const ROOT: &str = "referral";

/// A `Referral`.
pub(super) fn referral(r: &pb::Referral, ctx: &BodyContext) -> Check {
    let _: pb::ReferralPurpose = enum_required(r.purpose, &at(ROOT, "purpose"))?;
    let person_path = at(ROOT, "person");
    let facts = person(present(&r.person, &person_path)?, &person_path, ctx.today)?;
    child(r.child.as_ref(), facts, &at(ROOT, "child"), ctx.today)?;

    let consent_path = at(ROOT, "consent");
    let basis = consent(
        present(&r.consent, &consent_path)?,
        facts,
        pb::ConsentPurpose::Referral,
        &consent_path,
        ctx.today,
    )?;
    if !facts.maybe_child
        && !matches!(
            basis,
            pb::ConsentBasis::ExplicitConsent | pb::ConsentBasis::VitalInterests
        )
    {
        return fail(
            at(&consent_path, "basis"),
            "must be explicit consent for an adult's referral, unless the basis is vital interests",
        );
    }

    let handling_path = at(ROOT, "handling");
    let retain_until = handling(present(&r.handling, &handling_path)?, &handling_path)?;

    let ident_path = at(ROOT, "identification");
    let ident = present(&r.identification, &ident_path)?;
    let _: pb::IdentificationStatus = enum_required(ident.status, &at(&ident_path, "status"))?;
    let _: pb::OrganisationType =
        enum_required(ident.identified_by, &at(&ident_path, "identified_by"))?;
    let identified_on_path = at(&ident_path, "identified_on");
    let identified_on = date_required(&ident.identified_on, &identified_on_path)?;
    not_future(identified_on, ctx.today, &identified_on_path)?;

    if let Some(asylum) = &r.asylum {
        let stage_path = at(&at(ROOT, "asylum"), "stage");
        let stage: Option<pb::AsylumStage> = enum_optional(asylum.stage, &stage_path)?;
        match (asylum.in_asylum_procedure, stage) {
            (true, None) => {
                return fail(stage_path, "is required when in_asylum_procedure is true");
            }
            (false, Some(_)) => {
                return fail(
                    stage_path,
                    "must be unset when in_asylum_procedure is false",
                );
            }
            _ => {}
        }
    }

    let mut reflection_end = None;
    if let Some(period) = &r.reflection_period {
        let path = at(ROOT, "reflection_period");
        let start = date_required(&period.start_date, &at(&path, "start_date"))?;
        let end_path = at(&path, "end_date");
        reflection_end = date_optional(&period.end_date, &end_path)?;
        not_before(reflection_end, Some(start), &end_path, "start_date")?;
    }

    let exploitation_path = at(ROOT, "exploitation");
    let exploitation = present(&r.exploitation, &exploitation_path)?;
    let _: Vec<pb::ExploitationForm> =
        enum_set(&exploitation.forms, &at(&exploitation_path, "forms"), 1)?;
    let _: Vec<pb::LabourSector> = enum_set(
        &exploitation.labour_sectors,
        &at(&exploitation_path, "labour_sectors"),
        0,
    )?;
    let _: Vec<pb::MeansOfControl> = enum_set(
        &exploitation.means_of_control,
        &at(&exploitation_path, "means_of_control"),
        0,
    )?;
    countries(
        &exploitation.recruitment_countries,
        &at(&exploitation_path, "recruitment_countries"),
    )?;
    countries(
        &exploitation.transit_countries,
        &at(&exploitation_path, "transit_countries"),
    )?;
    countries(
        &exploitation.exploitation_countries,
        &at(&exploitation_path, "exploitation_countries"),
    )?;

    let _: Vec<pb::SpecificNeed> = enum_set(&r.specific_needs, &at(ROOT, "specific_needs"), 0)?;
    let _: pb::RiskLevel = enum_required(r.safety_risk, &at(ROOT, "safety_risk"))?;
    let _: Vec<pb::ServiceType> =
        enum_set(&r.requested_services, &at(ROOT, "requested_services"), 1)?;

    let respond_by_path = at(ROOT, "respond_by");
    let respond_by = date_optional(&r.respond_by, &respond_by_path)?;
    not_before(
        respond_by,
        Some(identified_on),
        &respond_by_path,
        "identification.identified_on",
    )?;
    retain_after(
        retain_until,
        &[
            (Some(identified_on), "identification.identified_on"),
            (respond_by, "respond_by"),
            (reflection_end, "reflection_period.end_date"),
        ],
        &at(&handling_path, "retain_until"),
    )?;

    let contact_path = at(ROOT, "contact");
    contact(present(&r.contact, &contact_path)?, &contact_path)?;
    notes(r.notes.as_ref(), &at(ROOT, "notes"))?;
    attachments(&r.attachments, &at(ROOT, "attachments"))
}

/// `retain_until` is not before any of `dates`.
pub(super) fn retain_after(
    retain_until: Date,
    dates: &[(Option<Date>, &str)],
    path: &str,
) -> Check {
    for (date, what) in dates {
        not_before(Some(retain_until), *date, path, what)?;
    }
    Ok(())
}

const RESPONSE_ROOT: &str = "referral_response";

/// A `ReferralResponse`.
pub(super) fn response(r: &pb::ReferralResponse, ctx: &BodyContext) -> Check {
    if ctx.in_reply_to.is_none() {
        return fail(
            "envelope.in_reply_to",
            "is required on a referral response (the referral's message_id)",
        );
    }
    let decision: pb::ReferralDecision = enum_required(r.decision, &at(RESPONSE_ROOT, "decision"))?;
    let reason_path = at(RESPONSE_ROOT, "reason");
    let reason: Option<pb::ResponseReason> = enum_optional(r.reason, &reason_path)?;
    if decision != pb::ReferralDecision::Accepted && reason.is_none() {
        return fail(reason_path, "is required unless the decision is accepted");
    }
    let onward_path = at(RESPONSE_ROOT, "onward_recipient");
    if decision == pb::ReferralDecision::ReferredOnward {
        participant(&r.onward_recipient, &onward_path).map_err(|e| {
            if r.onward_recipient.is_empty() {
                crate::ValidationError::new(
                    onward_path.clone(),
                    "is required when the decision is referred onward",
                )
            } else {
                e
            }
        })?;
    } else if !r.onward_recipient.is_empty() {
        return fail(
            onward_path,
            "must be empty unless the decision is referred onward",
        );
    }
    let _: Vec<pb::ServiceType> = enum_set(
        &r.planned_services,
        &at(RESPONSE_ROOT, "planned_services"),
        0,
    )?;
    date_optional(&r.expected_start, &at(RESPONSE_ROOT, "expected_start"))?;
    let contact_path = at(RESPONSE_ROOT, "contact");
    contact(present(&r.contact, &contact_path)?, &contact_path)?;
    notes(r.notes.as_ref(), &at(RESPONSE_ROOT, "notes"))
}
