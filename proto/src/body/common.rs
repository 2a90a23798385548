//! Checks of the shared pieces of `common.proto`: person, child protection,
//! consent, handling, contact point, attachment, free text.

use super::check::{
    Check, MAX_ATTACHMENT_BYTES, MAX_ATTACHMENTS, MAX_ATTACHMENTS_TOTAL_BYTES, MAX_NAME_CHARS,
    MAX_NOTES_CHARS, MAX_PSEUDONYM_CHARS, at, count, countries, date_optional, date_required,
    enum_optional, enum_required, enum_set, fail, instant, languages, not_future, nth, participant,
    text,
};
use crate::envelope::sha256;
use crate::pb;
use crate::time::Date;

/// What the person checks tell the rest of a body's checks.
#[derive(Debug, Clone, Copy)]
pub(super) struct PersonFacts {
    /// Under 18 by age band, or the age is disputed: treated as a child.
    pub(super) maybe_child: bool,
}

/// `PersonProfile` at `path`.
pub(super) fn person(p: &pb::PersonProfile, path: &str, today: Date) -> Check<PersonFacts> {
    text(
        &p.pseudonym,
        &at(path, "pseudonym"),
        MAX_PSEUDONYM_CHARS,
        true,
        false,
    )?;
    text(
        &p.given_names,
        &at(path, "given_names"),
        MAX_NAME_CHARS,
        false,
        false,
    )?;
    text(
        &p.family_name,
        &at(path, "family_name"),
        MAX_NAME_CHARS,
        false,
        false,
    )?;
    let dob_path = at(path, "date_of_birth");
    if let Some(dob) = date_optional(&p.date_of_birth, &dob_path)? {
        not_future(dob, today, &dob_path)?;
    }
    let band: pb::AgeBand = enum_required(p.age_band, &at(path, "age_band"))?;
    let _: pb::Gender = enum_required(p.gender, &at(path, "gender"))?;
    countries(&p.nationalities, &at(path, "nationalities"))?;
    languages(&p.languages, &at(path, "languages"))?;
    let _: Option<pb::IdentityDocuments> =
        enum_optional(p.identity_documents, &at(path, "identity_documents"))?;
    let under_18 = matches!(band, pb::AgeBand::Under9 | pb::AgeBand::From9To17);
    Ok(PersonFacts {
        maybe_child: under_18 || p.age_disputed,
    })
}

/// `ChildProtection` at `path`: required when the person may be a child.
pub(super) fn child(
    c: Option<&pb::ChildProtection>,
    facts: PersonFacts,
    path: &str,
    today: Date,
) -> Check {
    let Some(c) = c else {
        if facts.maybe_child {
            return fail(
                path,
                "is required when the person is under 18 or the age is disputed",
            );
        }
        return Ok(());
    };
    let guardian_path = at(path, "guardian_contact");
    match &c.guardian_contact {
        Some(guardian) => contact(guardian, &guardian_path)?,
        None if c.guardian_appointed => {
            return fail(guardian_path, "is required when guardian_appointed is true");
        }
        None => {}
    }
    let bia_path = at(path, "best_interests_assessment");
    let bia: pb::BestInterestsAssessment = enum_required(c.best_interests_assessment, &bia_path)?;
    let date_path = at(path, "best_interests_assessment_date");
    let date = date_optional(&c.best_interests_assessment_date, &date_path)?;
    match (bia, date) {
        (pb::BestInterestsAssessment::Completed, None) => {
            return fail(date_path, "is required when the assessment is completed");
        }
        (pb::BestInterestsAssessment::NotStarted, Some(_)) => {
            return fail(
                date_path,
                "must be empty when the assessment has not started",
            );
        }
        (_, Some(date)) => not_future(date, today, &date_path)?,
        _ => {}
    }
    Ok(())
}

/// `Consent` at `path`: basis and purposes set, `purpose` covered, a child's
/// best interests only for a (possible) child, `given_at` set for explicit
/// consent and not in the future. Returns the basis.
pub(super) fn consent(
    c: &pb::Consent,
    facts: PersonFacts,
    purpose: pb::ConsentPurpose,
    path: &str,
    today: Date,
) -> Check<pb::ConsentBasis> {
    let basis_path = at(path, "basis");
    let basis: pb::ConsentBasis = enum_required(c.basis, &basis_path)?;
    if basis == pb::ConsentBasis::ChildBestInterests && !facts.maybe_child {
        return fail(
            basis_path,
            "may be a child's best interests only when the person is under 18 or the age is disputed",
        );
    }
    let purposes_path = at(path, "purposes");
    let purposes: Vec<pb::ConsentPurpose> = enum_set(&c.purposes, &purposes_path, 1)?;
    if !purposes.contains(&purpose) {
        return fail(
            purposes_path,
            format!("must include {}", purpose.as_str_name()),
        );
    }
    let given_path = at(path, "given_at");
    match &c.given_at {
        Some(ts) => {
            let given = instant(ts, &given_path)?;
            not_future(Date::of(given), today, &given_path)?;
        }
        None if basis == pb::ConsentBasis::ExplicitConsent => {
            return fail(given_path, "is required when the basis is explicit consent");
        }
        None => {}
    }
    if let Some(recorder) = &c.recorded_by {
        contact(recorder, &at(path, "recorded_by"))?;
    }
    Ok(basis)
}

/// `Handling` at `path`. Returns `retain_until`.
pub(super) fn handling(h: &pb::Handling, path: &str) -> Check<Date> {
    let _: pb::OnwardSharing = enum_required(h.onward_sharing, &at(path, "onward_sharing"))?;
    let _: pb::JudicialUse = enum_required(h.judicial_use, &at(path, "judicial_use"))?;
    date_required(&h.retain_until, &at(path, "retain_until"))
}

/// `ContactPoint` at `path`.
pub(super) fn contact(c: &pb::ContactPoint, path: &str) -> Check {
    text(
        &c.organisation,
        &at(path, "organisation"),
        MAX_NAME_CHARS,
        true,
        false,
    )?;
    if !c.participant_id.is_empty() {
        participant(&c.participant_id, &at(path, "participant_id"))?;
    }
    let _: pb::ContactRole = enum_required(c.role, &at(path, "role"))?;
    if c.phone.is_empty() && c.email.is_empty() {
        return fail(at(path, "phone"), "phone or email is required");
    }
    if !c.phone.is_empty() && !is_phone(&c.phone) {
        return fail(
            at(path, "phone"),
            "must be an E.164 number: '+' then 6 to 15 digits",
        );
    }
    if !c.email.is_empty() && !is_email(&c.email) {
        return fail(
            at(path, "email"),
            "must be an e-mail address of at most 254 characters",
        );
    }
    Ok(())
}

/// `+` then 6 to 15 digits.
fn is_phone(value: &str) -> bool {
    value.strip_prefix('+').is_some_and(|digits| {
        (6..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
    })
}

/// `local@domain.tld`, printable ASCII without spaces, at most 254 bytes.
fn is_email(value: &str) -> bool {
    if value.len() > 254 || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return false;
    }
    let Some((local, domain)) = value.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
}

/// Repeated `Attachment` at `path`: count, sizes, names, digests.
pub(super) fn attachments(list: &[pb::Attachment], path: &str) -> Check {
    count(list.len(), path, 0, MAX_ATTACHMENTS)?;
    let mut total = 0usize;
    for (i, a) in list.iter().enumerate() {
        let p = nth(path, i);
        let name_path = at(&p, "file_name");
        text(&a.file_name, &name_path, 255, true, false)?;
        if a.file_name.contains(['/', '\\']) || a.file_name == "." || a.file_name == ".." {
            return fail(name_path, "must be a file name without a path");
        }
        if !is_media_type(&a.media_type) {
            return fail(
                at(&p, "media_type"),
                if a.media_type.is_empty() {
                    "is required"
                } else {
                    "must be a media type type/subtype, e.g. application/pdf"
                },
            );
        }
        if a.content.is_empty() {
            return fail(at(&p, "content"), "is required");
        }
        if a.content.len() > MAX_ATTACHMENT_BYTES {
            return fail(at(&p, "content"), "must be at most 1 MiB");
        }
        total = total.saturating_add(a.content.len());
        if total > MAX_ATTACHMENTS_TOTAL_BYTES {
            return fail(path, "content must be at most 2 MiB in all");
        }
        if a.sha256.len() != 32 {
            return fail(at(&p, "sha256"), "must be 32 raw bytes (SHA-256)");
        }
        if sha256(&a.content).as_slice() != a.sha256.as_slice() {
            return fail(at(&p, "sha256"), "does not match the SHA-256 of content");
        }
    }
    Ok(())
}

/// `type/subtype` of RFC 6838 restricted-name characters, at most 127 bytes.
fn is_media_type(value: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'!' | b'#' | b'$' | b'&' | b'-' | b'^' | b'_' | b'.' | b'+'
                    )
            })
    };
    value.len() <= 127
        && value
            .split_once('/')
            .is_some_and(|(kind, sub)| token(kind) && token(sub))
}

/// `LocalizedText` at `path`.
pub(super) fn localized(t: &pb::LocalizedText, path: &str) -> Check {
    super::check::language(&t.language, &at(path, "language"))?;
    text(&t.text, &at(path, "text"), MAX_NOTES_CHARS, true, true)
}

/// An optional `LocalizedText` at `path`.
pub(super) fn notes(t: Option<&pb::LocalizedText>, path: &str) -> Check {
    t.map_or(Ok(()), |t| localized(t, path))
}
