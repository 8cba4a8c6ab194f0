//! Why a call failed, kept whole until the call's edge (the `Guard` methods), where a fault is
//! logged once and every error becomes the status the caller sees.

use tonic::Status;

use crate::audit;
use crate::backup::BackupError;
use crate::budget::Exhausted;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// An answer for the caller (refused, invalid, not found): not a fault of guardd's, so not
    /// logged here (refusals are audited where they are decided).
    #[error("{}", .0.message())]
    Refused(Status),
    /// A budget is used up: the caller should try again later.
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
    /// The token store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Backup codes could not be hashed or compared.
    #[error(transparent)]
    Backup(#[from] BackupError),
}

impl From<Status> for ServiceError {
    fn from(status: Status) -> ServiceError {
        ServiceError::Refused(status)
    }
}

impl ServiceError {
    /// The status the caller sees; a fault is logged here, once, with its details (which the
    /// caller does not see).
    pub fn into_status(self) -> Status {
        match self {
            ServiceError::Refused(status) => status,
            ServiceError::Exhausted(e) => Status::resource_exhausted(e.to_string()),
            ServiceError::Store(e) => {
                match &e {
                    // Repeats while the database is away: one line per interval is enough.
                    StoreError::Unavailable(_) | StoreError::Busy | StoreError::Overloaded => {
                        audit::warn_limited("store-unavailable", &e.to_string())
                    }
                    _ => tracing::error!("{e}"),
                }
                match e {
                    // The reason (a host name, a server message) is for the log only.
                    StoreError::Unavailable(_) => {
                        Status::unavailable("the token database is unreachable; see the guardd log")
                    }
                    StoreError::Busy | StoreError::Stopped => Status::unavailable(e.to_string()),
                    StoreError::Overloaded => Status::resource_exhausted(e.to_string()),
                    _ => Status::internal("the token database failed; see the guardd log"),
                }
            }
            ServiceError::Backup(BackupError::Busy) => {
                Status::resource_exhausted(BackupError::Busy.to_string())
            }
            ServiceError::Backup(e) => {
                tracing::error!("{e}");
                Status::internal("backup codes failed; see the guardd log")
            }
        }
    }
}
