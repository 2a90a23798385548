//! Checks of `ReturnRiskAssessmentRequest` and `ReturnRiskAssessment`.

use super::BodyContext;
use super::check::{
    Check, MAX_NAME_CHARS, at, count, country, date_optional, date_required, enum_optional,
    enum_required, enum_set, fail, not_future, nth, present, text,
};
use super::common::{child, consent, contact, handling, localized, notes, person};
use super::referral::retain_after;
use crate::pb;

const REQUEST_ROOT: &str = "return_risk_assessment_request";
const ROOT: &str = "return_risk_assessment";

/// Most findings of one assessment.
const MAX_FINDINGS: usize = 32;
/// Most available services of one assessment.
const MAX_SERVICES: usize = 64;

/// A `ReturnRiskAssessmentRequest`.
pub(super) fn request(r: &pb::ReturnRiskAssessmentRequest, ctx: &BodyContext) -> Check {
    let person_path = at(REQUEST_ROOT, "person");
    let facts = person(present(&r.person, &person_path)?, &person_path, ctx.today)?;
    child(
        r.child.as_ref(),
        facts,
        &at(REQUEST_ROOT, "child"),
        ctx.today,
    )?;
    let consent_path = at(REQUEST_ROOT, "consent");
    consent(
        present(&r.consent, &consent_path)?,
        facts,
        pb::ConsentPurpose::ReturnAssessment,
        &consent_path,
        ctx.today,
    )?;
    let handling_path = at(REQUEST_ROOT, "handling");
    let retain_until = handling(present(&r.handling, &handling_path)?, &handling_path)?;

    country(
        &r.destination_country,
        &at(REQUEST_ROOT, "destination_country"),
    )?;
    if !r.destination_region.is_empty()
        && !is_subdivision_of(&r.destination_region, &r.destination_country)
    {
        return fail(
            at(REQUEST_ROOT, "destination_region"),
            "must be an ISO 3166-2 subdivision code of destination_country, e.g. NG-ED",
        );
    }
    let planned = date_optional(
        &r.planned_return_date,
        &at(REQUEST_ROOT, "planned_return_date"),
    )?;
    if !r.voluntary_decision_confirmed {
        return fail(
            at(REQUEST_ROOT, "voluntary_decision_confirmed"),
            "must be true: assessments are only for voluntary returns",
        );
    }
    let factors_path = at(REQUEST_ROOT, "factors_to_assess");
    let factors: Vec<pb::RiskFactor> = enum_set(&r.factors_to_assess, &factors_path, 1)?;
    if !facts.maybe_child
        && let Some(i) = factors
            .iter()
            .position(|f| *f == pb::RiskFactor::FamilyCareCapacity)
    {
        return fail(
            nth(&factors_path, i),
            "may be the family's care capacity only when the person is under 18 or the age is disputed",
        );
    }
    let respond_by_path = at(REQUEST_ROOT, "respond_by");
    let respond_by = date_optional(&r.respond_by, &respond_by_path)?;
    if let (Some(respond_by), Some(planned)) = (respond_by, planned)
        && respond_by > planned
    {
        return fail(respond_by_path, "must not be after planned_return_date");
    }
    retain_after(
        retain_until,
        &[(respond_by, "respond_by"), (planned, "planned_return_date")],
        &at(&handling_path, "retain_until"),
    )?;
    let contact_path = at(REQUEST_ROOT, "contact");
    contact(present(&r.contact, &contact_path)?, &contact_path)?;
    notes(r.notes.as_ref(), &at(REQUEST_ROOT, "notes"))
}

/// `CC-XXX`: the country's code, `-`, 1 to 3 upper-case letters or digits.
fn is_subdivision_of(region: &str, country: &str) -> bool {
    region.split_once('-').is_some_and(|(cc, sub)| {
        cc == country
            && (1..=3).contains(&sub.len())
            && sub
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    })
}

/// A `ReturnRiskAssessment`.
pub(super) fn assessment(a: &pb::ReturnRiskAssessment, ctx: &BodyContext) -> Check {
    if ctx.in_reply_to.is_none() {
        return fail(
            "envelope.in_reply_to",
            "is required on a return risk assessment (the request's message_id)",
        );
    }
    let _: pb::RiskLevel = enum_required(a.overall_risk, &at(ROOT, "overall_risk"))?;
    let findings_path = at(ROOT, "findings");
    count(a.findings.len(), &findings_path, 1, MAX_FINDINGS)?;
    for (i, finding) in a.findings.iter().enumerate() {
        let path = nth(&findings_path, i);
        let factor_path = at(&path, "factor");
        let _: pb::RiskFactor = enum_required(finding.factor, &factor_path)?;
        if a.findings[..i].iter().any(|f| f.factor == finding.factor) {
            return fail(factor_path, "must not repeat a factor");
        }
        let _: pb::RiskLevel = enum_required(finding.level, &at(&path, "level"))?;
        if let Some(text) = &finding.finding {
            localized(text, &at(&path, "finding"))?;
        }
    }
    let recommendation: pb::ReturnRecommendation =
        enum_required(a.recommendation, &at(ROOT, "recommendation"))?;
    let measures_path = at(ROOT, "required_measures");
    let min_measures = usize::from(recommendation == pb::ReturnRecommendation::ProceedWithMeasures);
    let _: Vec<pb::ProtectiveMeasure> = enum_set(
        &a.required_measures,
        &measures_path,
        min_measures,
    )
    .map_err(|e| {
        if e.field == measures_path && min_measures == 1 && a.required_measures.is_empty() {
            crate::ValidationError::new(
                measures_path.clone(),
                "must have at least one entry when the recommendation is to proceed with measures",
            )
        } else {
            e
        }
    })?;
    let services_path = at(ROOT, "available_services");
    count(a.available_services.len(), &services_path, 0, MAX_SERVICES)?;
    for (i, service) in a.available_services.iter().enumerate() {
        let path = nth(&services_path, i);
        let _: pb::ServiceType = enum_required(service.service, &at(&path, "service"))?;
        text(
            &service.provider,
            &at(&path, "provider"),
            MAX_NAME_CHARS,
            true,
            false,
        )?;
        if let Some(c) = &service.contact {
            contact(c, &at(&path, "contact"))?;
        }
    }
    let _: Option<pb::FamilyAssessment> =
        enum_optional(a.family_assessment, &at(ROOT, "family_assessment"))?;
    let assessed_path = at(ROOT, "assessed_on");
    let assessed_on = date_required(&a.assessed_on, &assessed_path)?;
    not_future(assessed_on, ctx.today, &assessed_path)?;
    let valid_path = at(ROOT, "valid_until");
    let valid_until = date_required(&a.valid_until, &valid_path)?;
    if valid_until <= assessed_on {
        return fail(valid_path, "must be after assessed_on");
    }
    let by_path = at(ROOT, "assessed_by");
    contact(present(&a.assessed_by, &by_path)?, &by_path)?;
    notes(a.notes.as_ref(), &at(ROOT, "notes"))
}
