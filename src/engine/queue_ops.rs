//! Queue metadata operations: create, delete, list, attributes and dead-letter sources.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;

use super::queue::{Effects, Queue};
use super::{
    page_limit, queue_not_found, registry_key, search_page, AccountMeta, Engine, Mutation,
    QueueCell, QueueEntry, QueueSettings,
};
use crate::clock::Millis;
use crate::error::{CmqError, ErrorCode};
use crate::limits;
use crate::model::{QueueAttributeSet, QueueAttributes, QueueSummary};

impl Engine {
    // ---------------------------------------------------------------------------------------
    // Queues
    // ---------------------------------------------------------------------------------------

    /// CreateQueue. Returns the new queue's id.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NAME_FORMAT`], the attribute errors of [`QueueSettings::merged`],
    /// [`ErrorCode::ALREADY_EXISTS`] (names compare case-insensitively),
    /// [`ErrorCode::TOO_MANY_QUEUES`], and for a dead-letter policy
    /// [`ErrorCode::QUEUE_NOT_FOUND`] (no such queue in the account) or
    /// [`ErrorCode::INVALID_PARAMETER`] (the queue itself).
    pub fn create_queue(
        &self,
        account: &str,
        name: &str,
        attrs: &QueueAttributeSet,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<u64, CmqError> {
        Self::validate_queue_name(name)?;
        let mut settings = QueueSettings::default().merged(attrs)?;
        let lower = name.to_ascii_lowercase();
        let mut meta = self.meta.lock();
        let acct = meta.accounts.entry(account.to_owned()).or_default();
        if acct.queues.contains_key(&lower) {
            return Err(CmqError::new(
                ErrorCode::ALREADY_EXISTS,
                format!("queue {name} already exists (names are case-insensitive)"),
            ));
        }
        if acct.queues.len() >= self.config.queues_per_account_max {
            return Err(CmqError::new(
                ErrorCode::TOO_MANY_QUEUES,
                format!(
                    "the account has {} queues, the most it may have",
                    acct.queues.len()
                ),
            ));
        }
        let target = resolve_policy(acct, &lower, &mut settings)?;
        let id = self.next_queue_id.fetch_add(1, Ordering::Relaxed);
        let name: Arc<str> = Arc::from(name);
        let account: Arc<str> = Arc::from(account);
        let queue = Queue::new(id, &name, settings.clone(), now);
        self.insert_queue(
            acct,
            lower,
            target,
            Arc::clone(&account),
            Arc::clone(&name),
            id,
            queue,
        );
        drop(meta);
        out.push(Mutation::QueueCreated {
            account,
            queue_id: id,
            name,
            settings,
            created_at_ms: now,
        });
        Ok(id)
    }

    /// Registers a queue: its name (lowercase `lower`) and dead-letter target in its
    /// account, and its cell in both registries. The one queue insertion of CreateQueue and of
    /// a restore; the caller holds the metadata lock `acct` comes from and has checked the name
    /// and the policy. Returns the cell.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn insert_queue(
        &self,
        acct: &mut AccountMeta,
        lower: String,
        target: Option<String>,
        account: Arc<str>,
        name: Arc<str>,
        id: u64,
        queue: Queue,
    ) -> Arc<QueueCell> {
        if let Some(target) = &target {
            acct.sources
                .entry(target.clone())
                .or_default()
                .insert(lower.clone());
        }
        acct.queues.insert(
            lower,
            QueueEntry {
                id,
                name: Arc::clone(&name),
                dead_letter_target: target,
            },
        );
        let cell = Arc::new(QueueCell {
            id,
            account: Arc::clone(&account),
            name: Arc::clone(&name),
            state: Mutex::new(queue),
        });
        self.queues
            .insert(registry_key(&account, &name), Arc::clone(&cell));
        self.by_id.insert(id, Arc::clone(&cell));
        cell
    }

    /// DeleteQueue: the queue and its messages go at once; queues that used it as their
    /// dead-letter queue lose that policy. The name may be reused as soon as this returns.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn delete_queue(
        &self,
        account: &str,
        name: &str,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<(), CmqError> {
        let lower = name.to_ascii_lowercase();
        let mut meta = self.meta.lock();
        let acct = meta
            .accounts
            .get_mut(account)
            .ok_or_else(|| queue_not_found(name))?;
        let entry = acct
            .queues
            .remove(&lower)
            .ok_or_else(|| queue_not_found(name))?;
        if let Some(target) = &entry.dead_letter_target {
            if let Some(set) = acct.sources.get_mut(target) {
                set.remove(&lower);
                if set.is_empty() {
                    acct.sources.remove(target);
                }
            }
        }
        let sources = acct.sources.remove(&lower).unwrap_or_default();
        let mut unbound = Vec::new();
        for source in sources {
            if let Some(e) = acct.queues.get_mut(&source) {
                e.dead_letter_target = None;
                unbound.push(e.id);
            }
        }
        let removed = self.queues.remove(&registry_key(account, name));
        self.by_id.remove(&entry.id);

        let mut pending = Vec::new();
        for id in unbound {
            let Some(cell) = self.by_id.get(&id).map(|r| Arc::clone(r.value())) else {
                continue;
            };
            let mut fx = Effects::default();
            let (settings, modified) = {
                let mut q = cell.state.lock();
                let mut settings = q.settings().clone();
                settings.dead_letter_policy = None;
                q.set_settings(settings.clone(), now, &mut fx);
                self.reschedule(cell.id, &mut q);
                (settings, q.modified_ms())
            };
            self.free(fx.freed_bytes);
            pending.append(&mut fx.dead_letters);
            out.push(Mutation::QueueAttributesSet {
                account: Arc::clone(&cell.account),
                queue_id: cell.id,
                name: Arc::clone(&cell.name),
                settings,
                modified_at_ms: modified,
            });
        }
        if let Some((_, cell)) = removed {
            let freed = cell.state.lock().delete_all();
            self.free(freed);
        }
        drop(meta);
        // Sources cannot dead-letter once unbound, but a policy change may have flushed some
        // before it took effect; deliver them (to a queue that may be the one just deleted,
        // in which case they are dropped and said so).
        let account: Arc<str> = Arc::from(account);
        self.deliver(&account, pending, now, out);
        out.push(Mutation::QueueDeleted {
            account,
            queue_id: entry.id,
            name: Arc::clone(&entry.name),
            at_ms: now,
        });
        Ok(())
    }

    /// ListQueue: the account's queues sorted by name, those whose name contains `search_word`
    /// (case-insensitive; empty matches all), `limit` of them from `offset`. Returns the number
    /// that matched and the page.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::OUT_OF_RANGE`] when `limit` exceeds [`limits::LIST_LIMIT_MAX`] (0 means
    /// [`limits::LIST_LIMIT_DEFAULT`]).
    pub fn list_queues(
        &self,
        account: &str,
        search_word: &str,
        offset: u32,
        limit: u32,
    ) -> Result<(u64, Vec<QueueSummary>), CmqError> {
        let limit = page_limit(limit)?;
        let needle = search_word.to_ascii_lowercase();
        let meta = self.meta.lock();
        let Some(acct) = meta.accounts.get(account) else {
            return Ok((0, Vec::new()));
        };
        Ok(search_page(&acct.queues, &needle, offset, limit, |entry| {
            QueueSummary {
                queue_id: entry.id,
                queue_name: entry.name.to_string(),
            }
        }))
    }

    /// DescribeDeadLetterSourceQueues: the queues whose dead-letter policy names
    /// `dead_letter_queue`, sorted by name and paged as [`Engine::list_queues`].
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`], [`ErrorCode::OUT_OF_RANGE`] for the limit.
    pub fn dead_letter_sources(
        &self,
        account: &str,
        dead_letter_queue: &str,
        offset: u32,
        limit: u32,
    ) -> Result<(u64, Vec<QueueSummary>), CmqError> {
        let limit = page_limit(limit)?;
        let lower = dead_letter_queue.to_ascii_lowercase();
        let meta = self.meta.lock();
        let acct = meta
            .accounts
            .get(account)
            .filter(|a| a.queues.contains_key(&lower))
            .ok_or_else(|| queue_not_found(dead_letter_queue))?;
        let Some(sources) = acct.sources.get(&lower) else {
            return Ok((0, Vec::new()));
        };
        let page = sources
            .iter()
            .skip(offset as usize)
            .take(limit)
            .filter_map(|s| acct.queues.get(s))
            .map(|e| QueueSummary {
                queue_id: e.id,
                queue_name: e.name.to_string(),
            })
            .collect();
        Ok((sources.len() as u64, page))
    }

    /// GetQueueAttributes.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`].
    pub fn queue_attributes(
        &self,
        account: &str,
        name: &str,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<QueueAttributes, CmqError> {
        let sources: Vec<String> = {
            let lower = name.to_ascii_lowercase();
            let meta = self.meta.lock();
            meta.accounts
                .get(account)
                .and_then(|a| {
                    a.sources.get(&lower).map(|set| {
                        set.iter()
                            .filter_map(|s| a.queues.get(s))
                            .map(|e| e.name.to_string())
                            .collect()
                    })
                })
                .unwrap_or_default()
        };
        let cell = self.lookup(account, name)?;
        let max_delay_seconds = self.config.delay_seconds_max;
        self.run(&cell, now, out, |q, _now, _fx, _own| {
            let settings = q.settings();
            let counters = q.counters();
            Ok(QueueAttributes {
                queue_name: cell.name.to_string(),
                queue_id: cell.id,
                max_msg_heap_num: settings.max_msg_heap_num,
                polling_wait_seconds: settings.polling_wait_seconds,
                visibility_timeout_seconds: settings.visibility_timeout_seconds,
                max_msg_size_bytes: settings.max_msg_size_bytes,
                msg_retention_seconds: settings.msg_retention_seconds,
                rewind_seconds: settings.rewind_seconds,
                create_time_ms: q.created_ms(),
                last_modify_time_ms: q.modified_ms(),
                active_msg_num: counters.active,
                inactive_msg_num: counters.inactive,
                delay_msg_num: counters.delayed,
                rewind_msg_num: counters.rewind,
                min_msg_time_ms: counters.min_msg_time_ms,
                max_delay_seconds,
                dead_letter_policy: settings.dead_letter_policy.clone(),
                dead_letter_sources: sources,
            })
        })
    }

    /// SetQueueAttributes: `None` fields stay as they are; the result is validated as a whole.
    /// Updates lastModifyTime. Turning rewindSeconds to 0 drops the rewind area at once.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::QUEUE_NOT_FOUND`] (for the queue or its new dead-letter queue), the
    /// attribute errors of [`QueueSettings::merged`], [`ErrorCode::INVALID_PARAMETER`] when the
    /// dead-letter queue is the queue itself.
    pub fn set_queue_attributes(
        &self,
        account: &str,
        name: &str,
        attrs: &QueueAttributeSet,
        now: Millis,
        out: &mut Vec<Mutation>,
    ) -> Result<(), CmqError> {
        let lower = name.to_ascii_lowercase();
        let mut meta = self.meta.lock();
        let acct = meta
            .accounts
            .get_mut(account)
            .ok_or_else(|| queue_not_found(name))?;
        let entry = acct
            .queues
            .get(&lower)
            .cloned()
            .ok_or_else(|| queue_not_found(name))?;
        let cell = self
            .by_id
            .get(&entry.id)
            .map(|r| Arc::clone(r.value()))
            .ok_or_else(|| queue_not_found(name))?;
        let mut fx = Effects::default();
        let result = {
            let mut q = cell.state.lock();
            if q.deleted {
                return Err(queue_not_found(name));
            }
            let now = q.advance(now, &mut fx);
            let changed = q.settings().merged(attrs).and_then(|mut next| {
                let target = match &attrs.dead_letter_policy {
                    // A new policy: its queue must exist now.
                    Some(Some(_)) => resolve_policy(acct, &lower, &mut next)?,
                    Some(None) => None,
                    None => entry.dead_letter_target.clone(),
                };
                Ok((next, target))
            });
            let result = match changed {
                Ok((next, target)) => {
                    q.set_settings(next.clone(), now, &mut fx);
                    Ok((next, target, q.modified_ms()))
                }
                Err(e) => Err(e),
            };
            self.reschedule(cell.id, &mut q);
            result
        };
        if let Ok((_, target, _)) = &result {
            if *target != entry.dead_letter_target {
                if let Some(old) = &entry.dead_letter_target {
                    if let Some(set) = acct.sources.get_mut(old) {
                        set.remove(&lower);
                        if set.is_empty() {
                            acct.sources.remove(old);
                        }
                    }
                }
                if let Some(new) = target {
                    acct.sources
                        .entry(new.clone())
                        .or_default()
                        .insert(lower.clone());
                }
                if let Some(e) = acct.queues.get_mut(&lower) {
                    e.dead_letter_target = target.clone();
                }
            }
        }
        drop(meta);
        self.count(&fx);
        self.free(fx.freed_bytes);
        self.deliver(&cell.account, fx.dead_letters, now, out);
        let (settings, _, modified) = result?;
        out.push(Mutation::QueueAttributesSet {
            account: Arc::clone(&cell.account),
            queue_id: cell.id,
            name: Arc::clone(&cell.name),
            settings,
            modified_at_ms: modified,
        });
        Ok(())
    }
}

/// Checks a dead-letter policy against the account's queues: the target must exist, must not
/// be the queue itself and must serve fewer than [`limits::DEAD_LETTER_SOURCES_MAX`] other
/// queues. Rewrites the target to its name as created and returns its
/// lowercase name (`None` when there is no policy).
fn resolve_policy(
    acct: &AccountMeta,
    lower: &str,
    settings: &mut QueueSettings,
) -> Result<Option<String>, CmqError> {
    let Some(policy) = settings.dead_letter_policy.as_mut() else {
        return Ok(None);
    };
    let target = policy.dead_letter_queue.to_ascii_lowercase();
    if target == lower {
        return Err(CmqError::new(
            ErrorCode::INVALID_PARAMETER,
            "a queue cannot be its own dead-letter queue",
        ));
    }
    let entry = acct
        .queues
        .get(&target)
        .ok_or_else(|| queue_not_found(&policy.dead_letter_queue))?;
    let sources = acct.sources.get(&target);
    let already = sources.is_some_and(|set| set.contains(lower));
    let count = sources.map_or(0, BTreeSet::len);
    if !already && count >= limits::DEAD_LETTER_SOURCES_MAX {
        return Err(CmqError::new(
            ErrorCode::OUT_OF_RANGE,
            format!(
                "dead-letter queue {} already serves {count} source queues, the most it may",
                entry.name
            ),
        ));
    }
    policy.dead_letter_queue = entry.name.to_string();
    Ok(Some(target))
}
