//! Removing a route only while it still sends requests where the caller
//! thinks it does: the prober removes a registration whose backend has been
//! dead for long, and must never remove the new registration a restarted
//! webservice wrote in the meantime. Compare and delete run in one script.

use crate::error::RouteTableError;
use crate::keys::{redirect_key, routes_key};
use crate::store::RouteStore;
use crate::types::{BackendUrl, ToolName};

/// `HDEL ARGV[1]` from `KEYS[1]` (routes) and `KEYS[2]` (redirects), as
/// `unregister` does, only while `KEYS[1]` field `ARGV[1]` still holds exactly
/// `ARGV[2]`. Both types are checked first, so it is all or nothing.
/// Returns 1 when removed, 0 when the field holds something else or is gone.
const DELETE_IF_SCRIPT: &str = r#"
for _, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'hash' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. kind .. ', not a hash')
  end
end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"#;

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
    /// deleted by a script only if it is still that exact value.
    pub async fn delete_route_if_backend(
        &self,
        tool: &ToolName,
        pattern: &str,
        backend: &BackendUrl,
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
                script
                    .key(routes_key(tool.as_str()))
                    .key(redirect_key(tool.as_str()))
                    .arg(pattern)
                    .arg(value)
                    .invoke_async(&mut c)
                    .await
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
