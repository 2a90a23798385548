//! Every DOMAIN.md rule, each with a valid and an invalid document.

use trmx_proto::ValidationError;
use trmx_proto::body::{Body, BodyContext};
use trmx_proto::envelope::sha256;
use trmx_proto::pb;
use trmx_proto::time::Date;

use super::{assert_reportable, ctx, follow_up, receipt, referral, response, rra, rra_request};

/// Validates `base` after `mutate`, with `ctx`.
fn run<M: Clone + Into<Body>>(
    base: &M,
    context: &BodyContext,
    mutate: impl FnOnce(&mut M),
) -> Result<(), ValidationError> {
    let mut message = base.clone();
    mutate(&mut message);
    message.into().validate(context)
}

/// `mutate` keeps `base` valid.
fn accepted<M: Clone + Into<Body>>(base: &M, mutate: impl FnOnce(&mut M)) {
    if let Err(e) = run(base, &ctx(), mutate) {
        panic!("expected valid, got {e}");
    }
}

/// `mutate` makes `base` invalid on `field`.
fn refused<M: Clone + Into<Body>>(base: &M, field: &str, mutate: impl FnOnce(&mut M)) {
    match run(base, &ctx(), mutate) {
        Ok(()) => panic!("expected an error on {field}, body was accepted"),
        Err(e) => {
            assert_eq!(e.field, field, "wrong field ({e})");
            assert_reportable(&e);
        }
    }
}

fn child_protection() -> pb::ChildProtection {
    pb::ChildProtection {
        unaccompanied: true,
        guardian_appointed: true,
        guardian_contact: Some(pb::ContactPoint {
            organisation: "Guardianship service".into(),
            participant_id: String::new(),
            role: pb::ContactRole::Guardian as i32,
            phone: "+31000000999".into(),
            email: String::new(),
        }),
        best_interests_assessment: pb::BestInterestsAssessment::InProgress as i32,
        best_interests_assessment_date: "2026-01-13".into(),
        family_tracing_requested: true,
    }
}

fn person(r: &mut pb::Referral) -> &mut pb::PersonProfile {
    r.person.as_mut().expect("example has a person")
}

fn consent(r: &mut pb::Referral) -> &mut pb::Consent {
    r.consent.as_mut().expect("example has consent")
}

#[test]
fn required_enums_must_not_be_unspecified_or_unknown() {
    let r = referral();
    accepted(&r, |_| {});
    refused(&r, "referral.purpose", |r| r.purpose = 0);
    refused(&r, "referral.person.age_band", |r| person(r).age_band = 0);
    refused(&r, "referral.person.age_band", |r| person(r).age_band = 99);
    refused(&r, "referral.person.gender", |r| person(r).gender = 0);
    refused(&r, "referral.safety_risk", |r| r.safety_risk = 0);
    refused(&r, "referral.identification.status", |r| {
        r.identification.as_mut().unwrap().status = 0
    });
    refused(&r, "referral.handling.onward_sharing", |r| {
        r.handling.as_mut().unwrap().onward_sharing = 0
    });
    refused(&r, "referral.requested_services[1]", |r| {
        r.requested_services[1] = 0
    });
    refused(&r, "referral.requested_services", |r| {
        r.requested_services.clear()
    });
    refused(&r, "referral.requested_services[2]", |r| {
        r.requested_services[2] = r.requested_services[0]
    });
    refused(&r, "referral.exploitation.forms", |r| {
        r.exploitation.as_mut().unwrap().forms.clear()
    });
    // An optional enum may be unset, but not unknown.
    accepted(&r, |r| person(r).identity_documents = 0);
    refused(&r, "referral.person.identity_documents", |r| {
        person(r).identity_documents = 42
    });

    let a = rra();
    accepted(&a, |_| {});
    refused(&a, "return_risk_assessment.overall_risk", |a| {
        a.overall_risk = 0
    });
    refused(&a, "return_risk_assessment.findings[3].level", |a| {
        a.findings[3].level = 0
    });
    refused(&a, "return_risk_assessment.findings[1].factor", |a| {
        a.findings[1].factor = a.findings[0].factor
    });
    let f = follow_up();
    accepted(&f, |_| {});
    refused(&f, "follow_up.stage", |f| f.stage = 0);
    refused(&f, "follow_up.events[0].type", |f| f.events[0].r#type = 0);
    refused(&f, "follow_up.progress[2].dimension", |f| {
        f.progress[2].dimension = f.progress[0].dimension
    });
}

#[test]
fn pseudonym_is_required_and_bounded() {
    let r = referral();
    accepted(&r, |r| person(r).pseudonym = "x".repeat(64));
    refused(&r, "referral.person.pseudonym", |r| {
        person(r).pseudonym.clear()
    });
    refused(&r, "referral.person.pseudonym", |r| {
        person(r).pseudonym = "   ".into()
    });
    refused(&r, "referral.person.pseudonym", |r| {
        person(r).pseudonym = "x".repeat(65)
    });
    refused(&r, "referral.person.pseudonym", |r| {
        person(r).pseudonym = "A\u{7}B".into()
    });
    refused(&r, "referral.person", |r| r.person = None);
    let q = rra_request();
    refused(&q, "return_risk_assessment_request.person.pseudonym", |q| {
        q.person.as_mut().unwrap().pseudonym.clear()
    });
}

#[test]
fn child_protection_is_required_for_children_and_disputed_ages() {
    let r = referral();
    accepted(&r, |r| {
        person(r).age_band = pb::AgeBand::From9To17 as i32;
        r.child = Some(child_protection());
    });
    refused(&r, "referral.child", |r| {
        person(r).age_band = pb::AgeBand::From9To17 as i32
    });
    refused(&r, "referral.child", |r| {
        person(r).age_band = pb::AgeBand::Under9 as i32
    });
    refused(&r, "referral.child", |r| person(r).age_disputed = true);
    accepted(&r, |r| {
        person(r).age_disputed = true;
        r.child = Some(child_protection());
    });
    refused(&r, "referral.child.guardian_contact", |r| {
        person(r).age_disputed = true;
        let mut child = child_protection();
        child.guardian_contact = None;
        r.child = Some(child);
    });
    refused(&r, "referral.child.best_interests_assessment", |r| {
        person(r).age_disputed = true;
        let mut child = child_protection();
        child.best_interests_assessment = 0;
        r.child = Some(child);
    });
    refused(&r, "referral.child.best_interests_assessment_date", |r| {
        person(r).age_disputed = true;
        let mut child = child_protection();
        child.best_interests_assessment = pb::BestInterestsAssessment::Completed as i32;
        child.best_interests_assessment_date.clear();
        r.child = Some(child);
    });
    let q = rra_request();
    refused(&q, "return_risk_assessment_request.child", |q| {
        q.person.as_mut().unwrap().age_disputed = true
    });
}

#[test]
fn an_adults_referral_needs_explicit_consent_unless_vital_interests() {
    let r = referral();
    accepted(&r, |r| {
        consent(r).basis = pb::ConsentBasis::VitalInterests as i32;
        consent(r).given_at = None;
    });
    refused(&r, "referral.consent.basis", |r| {
        consent(r).basis = pb::ConsentBasis::LegalObligation as i32
    });
    refused(&r, "referral.consent.basis", |r| {
        consent(r).basis = pb::ConsentBasis::ChildBestInterests as i32
    });
    refused(&r, "referral.consent.basis", |r| consent(r).basis = 0);
    // For a child, the child's best interests (or a legal obligation) will do.
    accepted(&r, |r| {
        person(r).age_band = pb::AgeBand::From9To17 as i32;
        r.child = Some(child_protection());
        consent(r).basis = pb::ConsentBasis::ChildBestInterests as i32;
    });
    accepted(&r, |r| {
        person(r).age_disputed = true;
        r.child = Some(child_protection());
        consent(r).basis = pb::ConsentBasis::LegalObligation as i32;
    });
    // Explicit consent needs the moment it was given.
    refused(&r, "referral.consent.given_at", |r| {
        consent(r).given_at = None
    });
    refused(&r, "referral.consent", |r| r.consent = None);
}

#[test]
fn consent_purposes_must_cover_the_message_purpose() {
    let r = referral();
    accepted(&r, |r| {
        consent(r).purposes = vec![pb::ConsentPurpose::Referral as i32]
    });
    refused(&r, "referral.consent.purposes", |r| {
        consent(r).purposes = vec![pb::ConsentPurpose::FollowUp as i32]
    });
    refused(&r, "referral.consent.purposes", |r| {
        consent(r).purposes.clear()
    });
    refused(&r, "referral.consent.purposes[1]", |r| {
        consent(r).purposes = vec![
            pb::ConsentPurpose::Referral as i32,
            pb::ConsentPurpose::Referral as i32,
        ]
    });

    let q = rra_request();
    accepted(&q, |q| {
        q.consent.as_mut().unwrap().purposes = vec![pb::ConsentPurpose::ReturnAssessment as i32]
    });
    refused(&q, "return_risk_assessment_request.consent.purposes", |q| {
        q.consent.as_mut().unwrap().purposes = vec![pb::ConsentPurpose::Referral as i32]
    });
}

#[test]
fn a_return_assessment_is_only_for_a_confirmed_voluntary_return() {
    let q = rra_request();
    accepted(&q, |q| q.voluntary_decision_confirmed = true);
    refused(
        &q,
        "return_risk_assessment_request.voluntary_decision_confirmed",
        |q| q.voluntary_decision_confirmed = false,
    );
    refused(
        &q,
        "return_risk_assessment_request.factors_to_assess",
        |q| q.factors_to_assess.clear(),
    );
    refused(
        &q,
        "return_risk_assessment_request.factors_to_assess[8]",
        |q| {
            q.factors_to_assess
                .push(pb::RiskFactor::FamilyCareCapacity as i32)
        },
    );
}

#[test]
fn answers_need_in_reply_to() {
    let no_reply = BodyContext {
        in_reply_to: None,
        ..ctx()
    };
    for body in [Body::from(response()), Body::from(rra())] {
        body.validate(&ctx()).unwrap();
        assert_eq!(
            body.validate(&no_reply).unwrap_err().field,
            "envelope.in_reply_to"
        );
    }
    // Other kinds do not need it.
    Body::from(referral()).validate(&no_reply).unwrap();
    Body::from(follow_up()).validate(&no_reply).unwrap();
}

#[test]
fn referred_onward_needs_a_valid_onward_recipient() {
    let r = response();
    let onward = |r: &mut pb::ReferralResponse| {
        r.decision = pb::ReferralDecision::ReferredOnward as i32;
        r.reason = pb::ResponseReason::BetterServedElsewhere as i32;
    };
    accepted(&r, |r| {
        onward(r);
        r.onward_recipient = "BE-SURYA".into();
    });
    refused(&r, "referral_response.onward_recipient", onward);
    refused(&r, "referral_response.onward_recipient", |r| {
        onward(r);
        r.onward_recipient = "be-surya".into();
    });
    refused(&r, "referral_response.onward_recipient", |r| {
        r.onward_recipient = "BE-SURYA".into()
    });
    refused(&r, "referral_response.reason", |r| {
        r.decision = pb::ReferralDecision::Declined as i32
    });
    refused(&r, "referral_response.decision", |r| r.decision = 0);
}

#[test]
fn dates_are_valid_and_in_order() {
    let today = ctx().today;
    let tomorrow = Date::parse("9999-12-31").unwrap();
    assert!(tomorrow > today);

    let r = referral();
    refused(&r, "referral.identification.identified_on", |r| {
        r.identification.as_mut().unwrap().identified_on = "2026-02-30".into()
    });
    refused(&r, "referral.identification.identified_on", |r| {
        r.identification.as_mut().unwrap().identified_on = "12/01/2026".into()
    });
    refused(&r, "referral.identification.identified_on", |r| {
        r.identification.as_mut().unwrap().identified_on = tomorrow.to_string()
    });
    refused(&r, "referral.identification.identified_on", |r| {
        r.identification.as_mut().unwrap().identified_on.clear()
    });
    refused(&r, "referral.consent.given_at", |r| {
        consent(r).given_at = Some(pb::Timestamp {
            seconds: 253_402_300_000,
            nanos: 0,
        })
    });
    refused(&r, "referral.consent.given_at", |r| {
        consent(r).given_at = Some(pb::Timestamp {
            seconds: 1_767_000_000,
            nanos: -1,
        })
    });
    accepted(&r, |r| {
        r.reflection_period = Some(pb::ReflectionPeriod {
            start_date: "2026-01-12".into(),
            end_date: "2026-04-12".into(),
        })
    });
    refused(&r, "referral.reflection_period.end_date", |r| {
        r.reflection_period = Some(pb::ReflectionPeriod {
            start_date: "2026-04-12".into(),
            end_date: "2026-01-12".into(),
        })
    });
    refused(&r, "referral.respond_by", |r| {
        r.respond_by = "2026-01-11".into()
    });
    accepted(&r, |r| r.respond_by = "2026-01-12".into());
    accepted(&r, |r| r.respond_by.clear());
    refused(&r, "referral.handling.retain_until", |r| {
        r.handling.as_mut().unwrap().retain_until = "2026-01-20".into()
    });
    refused(&r, "referral.handling.retain_until", |r| {
        r.handling.as_mut().unwrap().retain_until.clear()
    });
    refused(&r, "referral.person.date_of_birth", |r| {
        person(r).date_of_birth = tomorrow.to_string()
    });
    accepted(&r, |r| person(r).date_of_birth = "2001-05-17".into());

    let q = rra_request();
    refused(&q, "return_risk_assessment_request.respond_by", |q| {
        q.respond_by = "2026-08-11".into()
    });
    refused(
        &q,
        "return_risk_assessment_request.planned_return_date",
        |q| q.planned_return_date = "2026-8-10".into(),
    );
    refused(
        &q,
        "return_risk_assessment_request.handling.retain_until",
        |q| q.handling.as_mut().unwrap().retain_until = "2026-08-09".into(),
    );

    let a = rra();
    refused(&a, "return_risk_assessment.valid_until", |a| {
        a.valid_until = a.assessed_on.clone()
    });
    refused(&a, "return_risk_assessment.assessed_on", |a| {
        a.assessed_on = tomorrow.to_string()
    });
    accepted(&a, |a| a.valid_until = "2026-07-21".into());

    let f = follow_up();
    refused(&f, "follow_up.next_follow_up_due", |f| {
        f.next_follow_up_due = f.reported_on.clone()
    });
    refused(&f, "follow_up.reported_on", |f| {
        f.reported_on = tomorrow.to_string()
    });
    refused(&f, "follow_up.events[1].occurred_on", |f| {
        f.events[1].occurred_on = "2026-11-13".into()
    });
}

#[test]
fn country_and_language_codes() {
    let r = referral();
    refused(&r, "referral.person.nationalities[0]", |r| {
        person(r).nationalities = vec!["ng".into()]
    });
    refused(&r, "referral.person.nationalities[0]", |r| {
        person(r).nationalities = vec!["NGA".into()]
    });
    refused(&r, "referral.person.languages[0]", |r| {
        person(r).languages = vec!["EN".into()]
    });
    refused(&r, "referral.person.languages[1]", |r| {
        person(r).languages = vec!["en".into(), "eng".into()]
    });
    refused(&r, "referral.exploitation.transit_countries[1]", |r| {
        r.exploitation.as_mut().unwrap().transit_countries[1] = "Libya".into()
    });
    refused(&r, "referral.notes.language", |r| {
        r.notes.as_mut().unwrap().language = "english".into()
    });
    accepted(&r, |r| person(r).languages = vec!["en".into(), "fr".into()]);

    let q = rra_request();
    refused(
        &q,
        "return_risk_assessment_request.destination_country",
        |q| q.destination_country = "NGA".into(),
    );
    refused(
        &q,
        "return_risk_assessment_request.destination_region",
        |q| q.destination_region = "GH-AA".into(),
    );
    accepted(&q, |q| q.destination_region.clear());
}

#[test]
fn attachments_digest_and_size() {
    let content = b"%PDF-1.7 consent form".to_vec();
    let attachment = pb::Attachment {
        file_name: "consent-form.pdf".into(),
        media_type: "application/pdf".into(),
        sha256: sha256(&content).to_vec(),
        content,
    };
    let r = referral();
    accepted(&r, |r| r.attachments = vec![attachment.clone()]);
    refused(&r, "referral.attachments[0].sha256", |r| {
        let mut a = attachment.clone();
        a.content.push(b'!');
        r.attachments = vec![a];
    });
    refused(&r, "referral.attachments[0].sha256", |r| {
        let mut a = attachment.clone();
        a.sha256.truncate(31);
        r.attachments = vec![a];
    });
    refused(&r, "referral.attachments[0].file_name", |r| {
        let mut a = attachment.clone();
        a.file_name = "../etc/passwd".into();
        r.attachments = vec![a];
    });
    refused(&r, "referral.attachments[0].media_type", |r| {
        let mut a = attachment.clone();
        a.media_type = "pdf".into();
        r.attachments = vec![a];
    });
    refused(&r, "referral.attachments[0].content", |r| {
        let mut a = attachment.clone();
        a.content = vec![0; trmx_proto::body::MAX_ATTACHMENT_BYTES + 1];
        a.sha256 = sha256(&a.content).to_vec();
        r.attachments = vec![a];
    });
    refused(&r, "referral.attachments", |r| {
        r.attachments = vec![attachment.clone(); trmx_proto::body::MAX_ATTACHMENTS + 1]
    });
}

#[test]
fn sizes_are_capped() {
    let r = referral();
    accepted(&r, |r| {
        r.notes.as_mut().unwrap().text = "é".repeat(trmx_proto::body::MAX_NOTES_CHARS)
    });
    refused(&r, "referral.notes.text", |r| {
        r.notes.as_mut().unwrap().text = "a".repeat(trmx_proto::body::MAX_NOTES_CHARS + 1)
    });
    refused(&r, "referral.notes.text", |r| {
        r.notes.as_mut().unwrap().text.clear()
    });
    refused(&r, "referral.person.nationalities", |r| {
        person(r).nationalities = (b'A'..=b'K').map(|c| format!("{}A", c as char)).collect()
    });
    refused(&r, "referral.contact.organisation", |r| {
        r.contact.as_mut().unwrap().organisation = "o".repeat(201)
    });
}

#[test]
fn contact_points() {
    let r = referral();
    refused(&r, "referral.contact", |r| r.contact = None);
    refused(&r, "referral.contact.phone", |r| {
        let c = r.contact.as_mut().unwrap();
        c.phone.clear();
        c.email.clear();
    });
    accepted(&r, |r| r.contact.as_mut().unwrap().phone.clear());
    refused(&r, "referral.contact.phone", |r| {
        r.contact.as_mut().unwrap().phone = "0031 20 555".into()
    });
    refused(&r, "referral.contact.email", |r| {
        r.contact.as_mut().unwrap().email = "not an address".into()
    });
    refused(&r, "referral.contact.participant_id", |r| {
        r.contact.as_mut().unwrap().participant_id = "nl-nrm".into()
    });
    refused(&r, "referral.contact.role", |r| {
        r.contact.as_mut().unwrap().role = 0
    });
}

#[test]
fn asylum_stage_follows_the_procedure_flag() {
    let r = referral();
    refused(&r, "referral.asylum.stage", |r| {
        r.asylum.as_mut().unwrap().stage = 0
    });
    refused(&r, "referral.asylum.stage", |r| {
        r.asylum.as_mut().unwrap().in_asylum_procedure = false
    });
    accepted(&r, |r| r.asylum = None);
}

#[test]
fn assessment_measures_and_follow_up_closure() {
    let a = rra();
    refused(&a, "return_risk_assessment.required_measures", |a| {
        a.required_measures.clear()
    });
    accepted(&a, |a| {
        a.recommendation = pb::ReturnRecommendation::NotAdvised as i32;
        a.required_measures.clear();
    });
    refused(&a, "return_risk_assessment.findings", |a| {
        a.findings.clear()
    });
    refused(
        &a,
        "return_risk_assessment.available_services[1].provider",
        |a| a.available_services[1].provider.clear(),
    );

    let f = follow_up();
    let close = |f: &mut pb::FollowUp| {
        f.stage = pb::FollowUpStage::Closure as i32;
        f.next_follow_up_due.clear();
    };
    accepted(&f, |f| {
        close(f);
        f.closure_reason = pb::ClosureReason::DurableSolutionReached as i32;
    });
    refused(&f, "follow_up.closure_reason", close);
    refused(&f, "follow_up.next_follow_up_due", |f| {
        close(f);
        f.closure_reason = pb::ClosureReason::DurableSolutionReached as i32;
        f.next_follow_up_due = "2027-02-10".into();
    });
    refused(&f, "follow_up.closure_reason", |f| {
        f.closure_reason = pb::ClosureReason::LostContact as i32
    });
    refused(&f, "follow_up.events[0].services", |f| {
        f.events[0].services.clear()
    });
}

#[test]
fn receipts() {
    let r = receipt();
    accepted(&r, |_| {});
    refused(&r, "receipt.message_id", |r| r.message_id = "42".into());
    refused(&r, "receipt.message_id", |r| r.message_id.clear());
    refused(&r, "receipt.outcome", |r| r.outcome = 0);
    refused(&r, "receipt.at", |r| r.at = None);
    refused(&r, "receipt.reason_code", |r| {
        r.reason_code = "bad code".into()
    });
    refused(&r, "receipt.field_path", |r| r.field_path = "a b".into());
    accepted(&r, |r| {
        r.outcome = pb::Outcome::RejectedByRecipient as i32;
        r.reason_code = "INVALID_BODY".into();
        r.field_path = "referral.consent.purposes[0]".into();
    });
}

#[test]
fn errors_never_contain_the_value() {
    let secret = "Jane\u{7}Doe-SECRET";
    let r = referral();
    let err = run(&r, &ctx(), |r| person(r).pseudonym = secret.into()).unwrap_err();
    assert_eq!(err.field, "referral.person.pseudonym");
    let text = format!("{err} {err:?}");
    assert!(!text.contains("SECRET") && !text.contains("Jane"), "{text}");

    let long = format!("SECRET {}", "x".repeat(5000));
    let err = run(&r, &ctx(), |r| r.notes.as_mut().unwrap().text = long).unwrap_err();
    assert_eq!(err.field, "referral.notes.text");
    let text = format!("{err} {err:?}");
    assert!(!text.contains("SECRET"), "{text}");

    let err = run(&r, &ctx(), |r| {
        person(r).family_name = "Doe\u{0}SECRET".into()
    })
    .unwrap_err();
    assert!(!format!("{err:?}").contains("SECRET"));
}
