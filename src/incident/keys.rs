//! API keys for the incident API: a monitoring system gets a key with the scopes it needs
//! (`incidents:write` to open incidents, `incidents:ack` to claim and resolve them, `read`).
//! The key is shown once when it is made; reactor keeps only its SHA-256, so the database never
//! holds a usable key.

use jiff::Timestamp;
use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::history::{Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    #[serde(rename = "incidents:write")]
    IncidentsWrite,
    #[serde(rename = "incidents:ack")]
    IncidentsAck,
    #[serde(rename = "read")]
    Read,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::IncidentsWrite => "incidents:write",
            Scope::IncidentsAck => "incidents:ack",
            Scope::Read => "read",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

/// A key as stored: its name, scopes and the digest of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub name: String,
    pub scopes: Vec<Scope>,
    pub created_at: Timestamp,
    /// Hex SHA-256 of the key; never the key.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub digest: String,
}

/// The keys in sled: by name, and an index from digest to name.
#[derive(Clone)]
pub struct Keys {
    by_name: sled::Tree,
    by_digest: sled::Tree,
    store: Store,
}

fn hex_digest(secret: &str) -> String {
    digest(&SHA256, secret.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Keys {
    pub fn open(store: &Store) -> Result<Keys, StoreError> {
        Ok(Keys {
            by_name: store.tree("api_keys")?,
            by_digest: store.tree("api_keys_by_digest")?,
            store: store.clone(),
        })
    }

    /// Makes a key named `name`; returns it (the only time it exists in clear) with its record.
    /// `None` when the name is taken.
    pub async fn create(
        &self,
        name: &str,
        scopes: Vec<Scope>,
        now: Timestamp,
    ) -> Result<Option<(String, ApiKey)>, StoreError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system's random source works");
        let secret = format!(
            "rk_{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let key = ApiKey {
            name: name.to_owned(),
            scopes,
            created_at: now,
            digest: hex_digest(&secret),
        };
        let value = serde_json::to_vec(&key).expect("a key serializes");
        if self
            .by_name
            .compare_and_swap(name.as_bytes(), None as Option<&[u8]>, Some(value))?
            .is_err()
        {
            return Ok(None);
        }
        self.by_digest
            .insert(key.digest.as_bytes(), name.as_bytes())?;
        self.store.history_durable().await?;
        Ok(Some((secret, key)))
    }

    /// The key whose secret is `secret`, if any.
    pub fn find(&self, secret: &str) -> Result<Option<ApiKey>, StoreError> {
        let Some(name) = self.by_digest.get(hex_digest(secret).as_bytes())? else {
            return Ok(None);
        };
        Ok(self
            .by_name
            .get(&name)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// The key named `name`, if it exists.
    pub fn get(&self, name: &str) -> Result<Option<ApiKey>, StoreError> {
        Ok(self
            .by_name
            .get(name.as_bytes())?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Every key, without digests.
    pub fn list(&self) -> Result<Vec<ApiKey>, StoreError> {
        let mut out = Vec::new();
        for kv in self.by_name.iter() {
            let (_, v) = kv?;
            if let Ok(mut k) = serde_json::from_slice::<ApiKey>(&v) {
                k.digest.clear();
                out.push(k);
            }
        }
        Ok(out)
    }

    /// Revokes `name`; false when there is no such key.
    pub async fn revoke(&self, name: &str) -> Result<bool, StoreError> {
        let Some(v) = self.by_name.remove(name.as_bytes())? else {
            return Ok(false);
        };
        if let Ok(k) = serde_json::from_slice::<ApiKey>(&v) {
            self.by_digest.remove(k.digest.as_bytes())?;
        }
        self.store.history_durable().await?;
        Ok(true)
    }
}
