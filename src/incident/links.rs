//! Signed, expiring tokens: the one-click claim links in notifications and the console's session
//! cookie. A token is `base64url(payload).base64url(HMAC-SHA256(purpose, payload))`; the key is
//! 32 random bytes made once and kept in the history database, so links and sessions survive a
//! restart. A token made for one purpose is refused for another.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jiff::Timestamp;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::history::StoreError;

const SECRET: &[u8] = b"link_secret";

/// Signs and checks tokens with the database's key.
#[derive(Clone)]
pub struct Signer {
    key: hmac::Key,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

/// Why a claim link does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("this link is not valid: it was changed or cut, or it was not made by this reactor")]
    Invalid,
    #[error("this link expired at {0}")]
    Expired(Timestamp),
}

/// What a claim link carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    #[serde(rename = "n")]
    pub number: u64,
    /// The incident's opening (its escalation epoch): a link of an earlier opening does not
    /// claim the incident reopened.
    #[serde(rename = "o", default)]
    pub epoch: u32,
    /// The person paged, who claims by default.
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub person: Option<String>,
    #[serde(rename = "e")]
    pub expires: Timestamp,
}

impl Signer {
    /// The key kept in `meta`, made the first time.
    pub fn open(meta: &sled::Tree) -> Result<Signer, StoreError> {
        let mut fresh = [0u8; 32];
        SystemRandom::new().fill(&mut fresh).map_err(|_| {
            sled::Error::Io(std::io::Error::other("the system's random source failed"))
        })?;
        // The first start writes it; every later one (and a racing one) reads the same.
        let _ = meta.compare_and_swap(SECRET, None as Option<&[u8]>, Some(&fresh[..]))?;
        let secret = meta
            .get(SECRET)?
            .map(|v| v.to_vec())
            .unwrap_or(fresh.to_vec());
        Ok(Signer {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
        })
    }

    fn tag(&self, purpose: &str, payload: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(purpose.as_bytes());
        ctx.update(&[0]);
        ctx.update(payload);
        ctx.sign()
    }

    /// A token carrying `payload` for `purpose`.
    pub fn sign(&self, purpose: &str, payload: &[u8]) -> String {
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(self.tag(purpose, payload).as_ref())
        )
    }

    /// The payload of `token` when it was signed for `purpose` with this key.
    pub fn verify(&self, purpose: &str, token: &str) -> Option<Vec<u8>> {
        let (payload, tag) = token.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let mut ctx = Vec::with_capacity(purpose.len() + 1 + payload.len());
        ctx.extend_from_slice(purpose.as_bytes());
        ctx.push(0);
        ctx.extend_from_slice(&payload);
        hmac::verify(&self.key, &ctx, &tag).ok()?;
        Some(payload)
    }

    /// A claim link's token for opening `epoch` of incident `number`, sent to `person`, good
    /// until `expires`.
    pub fn claim_token(
        &self,
        number: u64,
        epoch: u32,
        person: Option<String>,
        expires: Timestamp,
    ) -> String {
        let payload = serde_json::to_vec(&Claim {
            number,
            epoch,
            person,
            expires,
        })
        .expect("a claim serializes");
        self.sign("claim", &payload)
    }

    /// The incident a claim link's token names, if it is genuine and not expired at `now`.
    pub fn claim(&self, token: &str, now: Timestamp) -> Result<Claim, LinkError> {
        let payload = self.verify("claim", token).ok_or(LinkError::Invalid)?;
        let claim: Claim = serde_json::from_slice(&payload).map_err(|_| LinkError::Invalid)?;
        if claim.expires <= now {
            return Err(LinkError::Expired(claim.expires));
        }
        Ok(claim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_link_opens_until_it_expires_and_not_when_changed_or_made_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let signer = Signer::open(&db.open_tree("m").unwrap()).unwrap();
        let again = Signer::open(&db.open_tree("m").unwrap()).unwrap();
        let now: Timestamp = "2027-03-29T08:00:00Z".parse().unwrap();
        let until: Timestamp = "2027-03-30T08:00:00Z".parse().unwrap();
        let token = signer.claim_token(7, 0, Some("alice".into()), until);
        assert_eq!(
            again.claim(&token, now),
            Ok(Claim {
                number: 7,
                epoch: 0,
                person: Some("alice".into()),
                expires: until
            }),
            "the key survives a restart"
        );
        assert_eq!(signer.claim(&token, until), Err(LinkError::Expired(until)));
        // Another incident's number with the same tag.
        let (_, tag) = token.split_once('.').unwrap();
        let forged = format!(
            "{}.{tag}",
            URL_SAFE_NO_PAD.encode(br#"{"n":8,"e":"2027-03-30T08:00:00Z"}"#)
        );
        assert_eq!(signer.claim(&forged, now), Err(LinkError::Invalid));
        assert_eq!(signer.claim("garbage", now), Err(LinkError::Invalid));
        let other = Signer::open(&db.open_tree("other").unwrap()).unwrap();
        assert_eq!(other.claim(&token, now), Err(LinkError::Invalid));
        // A session token is not a claim link.
        let session = signer.sign("session", br#"{"n":7,"e":"2027-03-30T08:00:00Z"}"#);
        assert_eq!(signer.claim(&session, now), Err(LinkError::Invalid));
    }
}
