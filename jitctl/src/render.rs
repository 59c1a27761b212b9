//! What jitctl prints: one-line descriptions, tables for people, JSON for scripts (the API's
//! messages through serde, so JSON carries every field the API has).

use std::time::Duration;

use jit_api::{
    GrantState, RequestState, duration::format_duration, pb, table::render as render_table,
};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(ms: i64) -> String {
    format_duration(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// How long ago `ms` was.
fn ago(ms: i64) -> String {
    millis(now_ms().saturating_sub(ms).max(0))
}

/// How long until `until_ms`, or `-` when it has passed.
fn left(until_ms: i64) -> String {
    let d = until_ms.saturating_sub(now_ms());
    if d <= 0 { "-".into() } else { millis(d) }
}

/// What the kernel counted under a grant: `-` when this node does not know, `no` when unused,
/// else packets and when the last one passed.
fn used(u: Option<&pb::GrantUsage>) -> String {
    match u {
        None => "-".into(),
        Some(u) if u.packets == 0 => "no".into(),
        Some(u) => {
            let ago = now_ms().saturating_sub(u.last_seen_unix_ms).max(0);
            // Whole seconds: the kernel's clock and the agent's convert to within a millisecond.
            let ago = format_duration(Duration::from_secs(u64::try_from(ago / 1000).unwrap_or(0)));
            format!("{} pkts, last {ago} ago", u.packets)
        }
    }
}

fn seconds(s: u64) -> String {
    format_duration(Duration::from_secs(s))
}

/// A state, marked when it belongs to break-glass access.
fn marked(state: &str, break_glass: bool) -> String {
    if break_glass {
        format!("{state} (break-glass)")
    } else {
        state.to_string()
    }
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(", ")
    }
}

fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(v)?)
}

/// One request, as a line (and the policies that decided it).
pub(crate) fn describe(r: &pb::AccessRequest) -> String {
    let mut s = format!(
        "{}request {} for {} ({}): {}",
        if r.break_glass { "BREAK-GLASS " } else { "" },
        r.id,
        r.service,
        seconds(r.duration_seconds),
        RequestState::word_of(r.state)
    );
    if r.clamped {
        s.push_str(" [duration clamped to the service maximum]");
    }
    match RequestState::try_from(r.state) {
        Ok(RequestState::Pending) => s.push_str(&format!(
            ", {}/{} approvals",
            r.approvals.len(),
            r.approvals_required
        )),
        Ok(RequestState::Granted) => s.push_str(&format!(", grant {}", r.grant_id)),
        Ok(RequestState::Denied) => {
            let by = if r.denied_by.is_empty() {
                "policy"
            } else {
                &r.denied_by
            };
            s.push_str(&format!(" by {by}"));
            if !r.denial_reason.is_empty() {
                s.push_str(&format!(": {}", r.denial_reason));
            }
        }
        _ => {}
    }
    if !r.policies.is_empty() {
        s.push_str(&format!("\n  decided by: {}", r.policies.join(", ")));
    }
    s
}

/// A request as `watch` follows it.
pub(crate) fn watch_line(r: &pb::AccessRequest) -> String {
    format!(
        "{}{} {} by {} for {} ({}), {} ago: {}",
        if r.break_glass { "BREAK-GLASS " } else { "" },
        r.id,
        RequestState::word_of(r.state),
        r.requester,
        r.service,
        seconds(r.duration_seconds),
        ago(r.created_unix_ms),
        if r.reason.is_empty() { "-" } else { &r.reason }
    )
}

/// A listing as JSON or a table (`empty` when there is nothing).
fn listing<T: serde::Serialize>(
    items: &[T],
    as_json: bool,
    empty: &str,
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<String> {
    if as_json {
        return json(&items);
    }
    if items.is_empty() {
        return Ok(empty.to_string());
    }
    let rows: Vec<Vec<String>> = items.iter().map(row).collect();
    Ok(render_table(header, &rows).trim_end().to_string())
}

/// `ls requests`.
pub(crate) fn requests(rs: &[pb::AccessRequest], as_json: bool) -> anyhow::Result<String> {
    listing(
        rs,
        as_json,
        "no requests",
        &[
            "ID",
            "STATE",
            "REQUESTER",
            "SERVICE",
            "FOR",
            "APPROVALS",
            "AGE",
            "REASON",
        ],
        |r| {
            vec![
                r.id.clone(),
                marked(RequestState::word_of(r.state), r.break_glass),
                r.requester.clone(),
                r.service.clone(),
                seconds(r.duration_seconds),
                format!("{}/{}", r.approvals.len(), r.approvals_required),
                ago(r.created_unix_ms),
                r.reason.clone(),
            ]
        },
    )
}

/// `ls grants`.
pub(crate) fn grants(gs: &[pb::Grant], as_json: bool) -> anyhow::Result<String> {
    listing(
        gs,
        as_json,
        "no grants",
        &[
            "ID", "STATE", "IDENTITY", "SERVICE", "LEFT", "SOURCES", "USED",
        ],
        |g| {
            vec![
                g.id.clone(),
                marked(GrantState::word_of(g.state), g.break_glass),
                g.identity.clone(),
                g.service.clone(),
                if g.state == GrantState::Active as i32 {
                    left(g.expires_unix_ms)
                } else {
                    "-".into()
                },
                g.sources.join(","),
                used(g.usage.as_ref()),
            ]
        },
    )
}

/// `whoami`.
pub(crate) fn who_am_i(w: &pb::WhoAmIResponse) -> String {
    [
        format!("identity:    {}", w.identity),
        format!("may request: {}", list_or_none(&w.may_request)),
        format!("groups:      {}", list_or_none(&w.groups)),
        format!("may approve: {}", list_or_none(&w.may_approve)),
        format!("break glass: {}", list_or_none(&w.may_break_glass)),
        format!(
            "admin:       {}",
            if w.may_revoke_any { "yes" } else { "no" }
        ),
    ]
    .join("\n")
}

/// `status`.
pub(crate) fn status(st: &pb::StatusResponse, as_json: bool) -> anyhow::Result<String> {
    if as_json {
        return json(st);
    }
    let mut out = format!(
        "agent {}: gate on {}\n{} pending request(s), {} active grant(s), {} in the kernel; {} \
         kernel repair(s), {} failed kernel write(s) since start\n",
        st.version,
        list_or_none(&st.attachments),
        st.pending_requests,
        st.active_grants,
        st.kernel_grants,
        st.kernel_repairs,
        st.kernel_sync_failures
    );
    if !st.corrupt_records.is_empty() {
        out.push_str(&format!(
            "store records that cannot be decoded (skipped): {}\n",
            st.corrupt_records.join(", ")
        ));
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = st
        .services
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.mode.clone(),
                s.destinations.join(","),
                seconds(s.max_duration_seconds),
                s.approvals_required.to_string(),
                s.active_grants.to_string(),
            ]
        })
        .collect();
    out.push_str(&render_table(
        &[
            "SERVICE",
            "MODE",
            "DESTINATIONS",
            "MAX",
            "APPROVALS",
            "GRANTS",
        ],
        &rows,
    ));
    Ok(out.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_listings_carry_states_as_words_and_every_field() {
        let g = pb::Grant {
            id: "g-1".into(),
            state: GrantState::Expired as i32,
            revoke_reason: String::new(),
            ..Default::default()
        };
        let v: serde_json::Value =
            serde_json::from_str(&grants(&[g], true).expect("render")).expect("JSON");
        assert_eq!(v[0]["state"], "expired");
        assert_eq!(v[0]["id"], "g-1");
        assert!(v[0].get("not_before_unix_ms").is_some(), "{v}");
        assert_eq!(grants(&[], false).expect("render"), "no grants");
    }

    #[test]
    fn a_denied_request_names_who_denied_it() {
        let r = pb::AccessRequest {
            id: "req-1".into(),
            service: "db".into(),
            duration_seconds: 900,
            state: RequestState::Denied as i32,
            denied_by: "spiffe://ex.org/bob".into(),
            denial_reason: "not now".into(),
            ..Default::default()
        };
        assert_eq!(
            describe(&r),
            "request req-1 for db (15m): denied by spiffe://ex.org/bob: not now"
        );
    }
}
