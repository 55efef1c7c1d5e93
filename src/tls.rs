//! TLS for reactor's HTTP clients (Alertmanager, Kubernetes): rustls with the ring provider,
//! installed once for the process.

/// Installs rustls' ring provider process-wide. Test builds carry two TLS backends, so rustls
/// cannot pick one by itself; calling this twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
