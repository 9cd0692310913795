//! Removing a route only while it still sends requests where the caller
//! thinks it does: the prober removes a registration whose backend has been
//! dead for long, and must never remove the new registration a restarted
//! webservice wrote in the meantime. Compare and delete run in one script.

use crate::error::RouteTableError;
use crate::keys::{redirect_key, routes_key};
use crate::provenance::RouteSource;
use crate::store::{RouteStore, check_types, record_fn, recorded};
use crate::types::{BackendUrl, ToolName};

/// `HDEL ARGV[5]` from `KEYS[3]` (routes) and `KEYS[4]` (redirects), as
/// `unregister` does, only while `KEYS[3]` field `ARGV[5]` still holds exactly
/// `ARGV[6]`; recorded in the audit stream and the provenance like every
/// other write (see [`crate::store`]). All types are checked first, so it is
/// all or nothing. Returns 1 when removed, 0 when the field holds something
/// else or is gone.
const DELETE_IF_SCRIPT: &str = concat!(
    check_types!("hash", "stream", "hash", "hash"),
    record_fn!(),
    r#"
if redis.call('HGET', KEYS[3], ARGV[5]) ~= ARGV[6] then
  return 0
end
redis.call('HDEL', KEYS[3], ARGV[5])
redis.call('HDEL', KEYS[4], ARGV[5])
record('delete', ARGV[5], ARGV[6])
return 1
"#
);

/// What became of a guarded removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardedDelete {
    /// The route still sent requests to the expected backend and is gone.
    Deleted,
    /// The route now names another backend (a new registration): kept.
    Changed {
        /// The value found in the field.
        current: String,
    },
    /// The route was already gone.
    Absent,
}

impl RouteStore {
    /// Removes `tool`'s route `pattern` (from both hashes, as `unregister`
    /// does) only while it still names `backend`. The stored value is read,
    /// parsed and compared (a value may be stored without its scheme), then
    /// deleted by a script only if it is still that exact value. The removal
    /// goes to the audit stream as `source`'s.
    pub async fn delete_route_if_backend(
        &self,
        tool: &ToolName,
        pattern: &str,
        backend: &BackendUrl,
        source: &RouteSource,
    ) -> Result<GuardedDelete, RouteTableError> {
        let current: Option<String> = self
            .run(|mut c| async move {
                redis::cmd("HGET").arg(routes_key(tool.as_str())).arg(pattern).query_async(&mut c).await
            })
            .await?;
        let Some(current) = current else { return Ok(GuardedDelete::Absent) };
        if BackendUrl::parse(&current).ok().as_ref() != Some(backend) {
            return Ok(GuardedDelete::Changed { current });
        }
        let script = redis::Script::new(DELETE_IF_SCRIPT);
        let value = current.as_str();
        let deleted: i64 = self
            .run(|mut c| async move {
                let mut invocation = recorded(&script, tool, source);
                invocation.key(routes_key(tool.as_str())).key(redirect_key(tool.as_str())).arg(pattern).arg(value);
                invocation.invoke_async(&mut c).await
            })
            .await?;
        if deleted == 1 {
            return Ok(GuardedDelete::Deleted);
        }
        // Changed between the read and the script: report what is there now.
        let now: Option<String> = self
            .run(|mut c| async move {
                redis::cmd("HGET").arg(routes_key(tool.as_str())).arg(pattern).query_async(&mut c).await
            })
            .await?;
        Ok(match now {
            Some(current) => GuardedDelete::Changed { current },
            None => GuardedDelete::Absent,
        })
    }
}
