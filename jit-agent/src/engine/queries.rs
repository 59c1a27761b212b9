//! What a caller may read: requests and grants, filtered by what the caller may see.

use super::{Engine, EngineError};
use crate::{
    identity::Caller,
    model::{Grant, Request},
    store::{Store, Versioned},
};

impl<S: Store> Engine<S> {
    pub(crate) fn load_request(&self, id: &str) -> Result<Versioned<Request>, EngineError> {
        if id.is_empty() {
            return Err(EngineError::InvalidArgument {
                field: "request_id",
                message: "is empty".into(),
            });
        }
        self.store
            .request(id)?
            .ok_or_else(|| EngineError::NotFound(format!("no request with id {id:?}")))
    }

    /// One request the caller may see.
    pub fn get_request(&self, caller: &Caller, id: &str) -> Result<Request, EngineError> {
        let r = self.load_request(id)?.value;
        if !self.may_see_request(caller, &r) {
            return Err(EngineError::NotFound(format!("no request with id {id:?}")));
        }
        Ok(r)
    }

    /// Requests the caller may see, newest first.
    pub fn list_requests(
        &self,
        caller: &Caller,
        q: &ListQuery,
    ) -> Result<Page<Request>, EngineError> {
        let now = self.now();
        // Pending requests only: the open index, not the history.
        let records = if q.only_current {
            self.store.open_requests()?
        } else {
            self.store.requests()?
        };
        let mut out: Vec<Request> = records
            .into_iter()
            .map(|r| r.value)
            .filter(|r| self.may_see_request(caller, r))
            .filter(|r| !q.only_current || r.is_waiting(now))
            .filter(|r| q.service.as_ref().is_none_or(|s| *s == r.service))
            .filter(|r| q.identity.as_ref().is_none_or(|i| *i == r.requester))
            .collect();
        out.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
        q.page(out, |r| (r.created_ms, r.id.clone()))
    }

    /// One grant the caller may see.
    pub fn get_grant(&self, caller: &Caller, id: &str) -> Result<Grant, EngineError> {
        self.store
            .grant(id)?
            .map(|g| g.value)
            .filter(|g| self.may_see_grant(caller, g))
            .ok_or_else(|| EngineError::NotFound(format!("no grant with id {id:?}")))
    }

    /// Grants the caller may see, newest first.
    pub fn list_grants(&self, caller: &Caller, q: &ListQuery) -> Result<Page<Grant>, EngineError> {
        let now = self.now();
        // Active grants only: the open index, not the history.
        let records = if q.only_current {
            self.store.open_grants()?
        } else {
            self.store.grants()?
        };
        let mut out: Vec<Grant> = records
            .into_iter()
            .map(|g| g.value)
            .filter(|g| self.may_see_grant(caller, g))
            .filter(|g| !q.only_current || g.is_live(now))
            .filter(|g| q.service.as_ref().is_none_or(|s| *s == g.service))
            .filter(|g| q.identity.as_ref().is_none_or(|i| *i == g.identity))
            .collect();
        out.sort_by(|a, b| b.not_before_ms.cmp(&a.not_before_ms).then(b.id.cmp(&a.id)));
        q.page(out, |g| (g.not_before_ms, g.id.clone()))
    }

    /// Requests still waiting for a decision at `now` (pending, TTL not passed), and grants in
    /// force: the node's counts for its status.
    pub fn counts(&self) -> Result<(Vec<Request>, Vec<Grant>), EngineError> {
        let now = self.now();
        let waiting = self
            .store
            .open_requests()?
            .into_iter()
            .map(|r| r.value)
            .filter(|r| r.is_waiting(now))
            .collect();
        let live = self
            .store
            .open_grants()?
            .into_iter()
            .map(|g| g.value)
            .filter(|g| g.is_live(now))
            .collect();
        Ok((waiting, live))
    }
}

/// What a listing asks for: a filter and a page.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// Only pending requests, or only active grants.
    pub only_current: bool,
    /// Only this service.
    pub service: Option<String>,
    /// Only this identity (requester, or holder).
    pub identity: Option<String>,
    /// Page size, 1 to [`MAX_PAGE`].
    pub page_size: usize,
    /// Where the previous page ended (its token), `None` for the first page.
    pub after: Option<(i64, String)>,
}

/// One page of a listing.
#[derive(Clone, Debug)]
pub struct Page<T> {
    /// The items, newest first.
    pub items: Vec<T>,
    /// The token of the next page; `None` on the last.
    pub next: Option<String>,
}

/// Page size when none is asked for.
pub const DEFAULT_PAGE: usize = 100;
/// The largest page.
pub const MAX_PAGE: usize = 1000;

impl ListQuery {
    /// A query from the API's fields: a size of 0 is [`DEFAULT_PAGE`], more than [`MAX_PAGE`] is
    /// [`MAX_PAGE`]; empty filters are none; a token that is not one this agent made is
    /// `InvalidArgument`.
    pub fn new(
        only_current: bool,
        service: &str,
        identity: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<Self, EngineError> {
        let after = if page_token.is_empty() {
            None
        } else {
            Some(
                parse_token(page_token).ok_or_else(|| EngineError::InvalidArgument {
                    field: "page_token",
                    message: "is not a token from a previous page".into(),
                })?,
            )
        };
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Ok(Self {
            only_current,
            service: non_empty(service),
            identity: non_empty(identity),
            page_size: match usize::try_from(page_size).unwrap_or(MAX_PAGE) {
                0 => DEFAULT_PAGE,
                n => n.min(MAX_PAGE),
            },
            after,
        })
    }

    /// The page of `sorted` (newest first by `key`, descending) after the token.
    fn page<T>(
        &self,
        sorted: Vec<T>,
        key: impl Fn(&T) -> (i64, String),
    ) -> Result<Page<T>, EngineError> {
        let start = match &self.after {
            None => 0,
            // Items strictly after the last one served, in the same order: a record added
            // meanwhile at the front is not served twice, nor one skipped further back.
            Some(after) => sorted
                .iter()
                .position(|t| {
                    let k = key(t);
                    (k.0, &k.1) < (after.0, &after.1)
                })
                .unwrap_or(sorted.len()),
        };
        let mut rest: Vec<T> = sorted.into_iter().skip(start).collect();
        let next = if rest.len() > self.page_size {
            rest.truncate(self.page_size);
            rest.last().map(|t| token(&key(t)))
        } else {
            None
        };
        Ok(Page { items: rest, next })
    }
}

/// The token of a page that ends at `key`: opaque to callers.
fn token(key: &(i64, String)) -> String {
    format!("{}.{}", key.0, key.1)
}

fn parse_token(t: &str) -> Option<(i64, String)> {
    let (time, id) = t.split_once('.')?;
    let valid_id = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    valid_id.then_some((time.parse().ok()?, id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(size: u32, token: &str) -> ListQuery {
        ListQuery::new(false, "", "", size, token).expect("query")
    }

    #[test]
    fn pages_follow_each_other_without_gap_or_repeat() {
        // Newest first: (time, id) descending.
        let items: Vec<(i64, String)> = (0..7).rev().map(|i| (i / 2, format!("x-{i}"))).collect();
        let mut seen = Vec::new();
        let mut token = String::new();
        for _ in 0..10 {
            let page = q(3, &token)
                .page(items.clone(), Clone::clone)
                .expect("page");
            seen.extend(page.items);
            match page.next {
                Some(t) => token = t,
                None => break,
            }
        }
        assert_eq!(seen, items);
    }

    #[test]
    fn sizes_are_bounded_and_bad_tokens_refused() {
        assert_eq!(q(0, "").page_size, DEFAULT_PAGE);
        assert_eq!(q(50_000, "").page_size, MAX_PAGE);
        for bad in ["x", "1.", ".id", "a.b", "1.has space", "1.a/b"] {
            assert!(
                matches!(
                    ListQuery::new(false, "", "", 1, bad),
                    Err(EngineError::InvalidArgument {
                        field: "page_token",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }
}
