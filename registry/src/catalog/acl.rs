//! ACL tokens in the catalog: whether the cluster was bootstrapped (default deny from
//! then on) and every token (accessor id, hash of the secret, rules, expiry). In the Raft
//! state, so every node checks a token against what it applied, without a round trip,
//! and a new node has them all.

use std::collections::HashMap;
use std::sync::Arc;

use super::apply::{ApplyError, ApplyResult, Reply};
use super::Catalog;
use crate::model::acl::{SecretHash, Token};

/// Tokens the cluster keeps (each a few hundred bytes in every replica and snapshot).
pub const MAX_TOKENS: usize = 10_000;

/// The ACL part of the catalog.
#[derive(Clone, Debug, Default)]
pub struct AclState {
    pub(super) bootstrapped: bool,
    /// Shared, so a request's caller holds its token without copying its rules.
    pub(super) tokens: std::collections::BTreeMap<String, Arc<Token>>,
    /// secret hash -> accessor id (derived from `tokens`).
    pub(super) by_hash: HashMap<SecretHash, String>,
}

impl AclState {
    pub(super) fn rebuild(bootstrapped: bool, tokens: Vec<Token>) -> Self {
        let mut s = AclState {
            bootstrapped,
            ..Default::default()
        };
        for t in tokens {
            s.by_hash
                .insert(t.secret_hash.clone(), t.accessor_id.clone());
            s.tokens.insert(t.accessor_id.clone(), Arc::new(t));
        }
        s
    }
}

impl Catalog {
    /// Whether ACLs are on (the cluster was bootstrapped): from then on the default is
    /// deny.
    pub fn acl_enabled(&self) -> bool {
        self.acl.bootstrapped
    }

    /// The token whose secret is `secret`, if any (expired ones too: the caller says why
    /// it is refused).
    pub fn token_by_secret(&self, secret: &str) -> Option<&Arc<Token>> {
        let hash = SecretHash::of(secret);
        let accessor = self.acl.by_hash.get(&hash)?;
        let token = self.acl.tokens.get(accessor)?;
        // The map found it by hash; compare again in constant time all the same.
        token.secret_hash.matches(secret).then_some(token)
    }

    pub fn token(&self, accessor_id: &str) -> Option<&Token> {
        self.acl.tokens.get(accessor_id).map(|t| &**t)
    }

    pub fn tokens(&self) -> impl Iterator<Item = &Token> {
        self.acl.tokens.values().map(|t| &**t)
    }

    fn insert_token(&mut self, token: &Token) -> Result<(), ApplyError> {
        if self.acl.tokens.contains_key(&token.accessor_id)
            || self.acl.by_hash.contains_key(&token.secret_hash)
        {
            return Err(ApplyError::TokenExists(token.accessor_id.clone()));
        }
        if self.acl.tokens.len() >= MAX_TOKENS {
            return Err(ApplyError::TooManyTokens(MAX_TOKENS));
        }
        self.acl
            .by_hash
            .insert(token.secret_hash.clone(), token.accessor_id.clone());
        self.acl
            .tokens
            .insert(token.accessor_id.clone(), Arc::new(token.clone()));
        Ok(())
    }

    fn done(&self) -> ApplyResult {
        ApplyResult {
            reply: Ok(Reply::Done {
                revision: self.revision,
            }),
            ..ApplyResult::refused(ApplyError::Batch)
        }
    }

    /// The first operator token; switches the default to deny. Once only.
    pub(super) fn acl_bootstrap(&mut self, token: &Token) -> ApplyResult {
        if self.acl.bootstrapped {
            return ApplyResult::refused(ApplyError::AlreadyBootstrapped);
        }
        if let Err(e) = self.insert_token(token) {
            return ApplyResult::refused(e);
        }
        self.acl.bootstrapped = true;
        self.done()
    }

    pub(super) fn put_token(&mut self, token: &Token) -> ApplyResult {
        match self.insert_token(token) {
            Ok(()) => self.done(),
            Err(e) => ApplyResult::refused(e),
        }
    }

    pub(super) fn delete_token(&mut self, accessor_id: &str) -> ApplyResult {
        let Some(t) = self.acl.tokens.remove(accessor_id) else {
            return ApplyResult::refused(ApplyError::TokenNotFound(accessor_id.to_string()));
        };
        self.acl.by_hash.remove(&t.secret_hash);
        self.done()
    }
}
