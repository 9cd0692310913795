//! Stand-ins for the flags of daemons that are not built yet.

use clap::Args;

/// Flags of `dynamicproxy proxy` (not available yet).
#[derive(Debug, Clone, Default, Args, serde::Serialize)]
pub struct ProxyFlags {}

/// Flags of `dynamicproxy registrar` (not available yet).
#[derive(Debug, Clone, Default, Args, serde::Serialize)]
pub struct RegistrarFlags {}

/// Flags of `dynamicproxy kube-sync` (not available yet).
#[derive(Debug, Clone, Default, Args, serde::Serialize)]
pub struct KubeSyncFlags {}
