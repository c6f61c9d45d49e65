//! Every state the store keeps as text, as an enum: the one place a state's database (and API)
//! spelling is written. Each enum maps to its text with `as_str`, parses back with `FromStr` /
//! `TryFrom<String>`, serializes as that text, and binds and decodes as TEXT on SQLite and
//! PostgreSQL; a spelling this version does not know is a decode error. Sets of states that
//! queries test with `IN (...)` are SQL text macros here, checked against the enums by tests.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;

/// A state read from the database (or a request) that this version does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown {what} '{value}'")]
pub struct UnknownState {
    what: &'static str,
    value: String,
}

/// Declares a state enum with its spellings, and implements the mapping traits for it.
macro_rules! states {
    (
        $(#[$meta:meta])*
        $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;
            fn from_str(value: &str) -> Result<Self, UnknownState> {
                match value {
                    $( $text => Ok($name::$variant), )+
                    _ => Err(UnknownState {
                        what: $what,
                        value: value.to_owned(),
                    }),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownState;
            fn try_from(value: String) -> Result<Self, UnknownState> {
                value.parse()
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<DB: sqlx::Database> sqlx::Type<DB> for $name
        where
            str: sqlx::Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <str as sqlx::Type<DB>>::type_info()
            }

            fn compatible(ty: &DB::TypeInfo) -> bool {
                <str as sqlx::Type<DB>>::compatible(ty)
            }
        }

        impl<'q, DB: sqlx::Database> sqlx::Encode<'q, DB> for $name
        where
            &'static str: sqlx::Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut <DB as sqlx::Database>::ArgumentBuffer,
            ) -> Result<IsNull, BoxDynError> {
                <&'static str as sqlx::Encode<'q, DB>>::encode_by_ref(&self.as_str(), buf)
            }

            fn size_hint(&self) -> usize {
                self.as_str().len()
            }
        }

        impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for $name
        where
            &'r str: sqlx::Decode<'r, DB>,
        {
            fn decode(value: <DB as sqlx::Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&'r str as sqlx::Decode<'r, DB>>::decode(value)?;
                Ok(text.parse::<$name>()?)
            }
        }
    };
}

states! {
    /// Where a command stands (`mdm_commands.status`).
    CommandStatus ("command status") {
        /// Waiting to be offered to the device.
        Queued => "queued",
        /// Offered; no answer yet.
        Sent => "sent",
        Acknowledged => "acknowledged",
        Error => "error",
        /// The device deferred it: offered again at its next Idle.
        NotNow => "not-now",
        FormatError => "format-error",
        /// Cancelled by an admin or a retirement before an answer.
        Cancelled => "cancelled",
    }
}

impl CommandStatus {
    /// Not answered for good: the queue still holds it ([`pending_commands_sql!`]).
    pub const PENDING: [CommandStatus; 3] = [
        CommandStatus::Queued,
        CommandStatus::Sent,
        CommandStatus::NotNow,
    ];
    /// Offered on any connect; `NotNow` ones wait for an Idle ([`offered_commands_sql!`]).
    pub const OFFERED: [CommandStatus; 2] = [CommandStatus::Queued, CommandStatus::Sent];
}

/// SQL text of [`CommandStatus::PENDING`], for `status IN <this>` (a literal for `concat!`).
macro_rules! pending_commands_sql {
    () => {
        "('queued', 'sent', 'not-now')"
    };
}
pub(crate) use pending_commands_sql;

/// SQL text of [`CommandStatus::OFFERED`], for `status IN <this>` (a literal for `concat!`).
macro_rules! offered_commands_sql {
    () => {
        "('queued', 'sent')"
    };
}
pub(crate) use offered_commands_sql;

states! {
    /// Where a command channel stands (`mdm_enrollments.status`).
    ChannelStatus ("channel status") {
        /// Authenticated, no push token yet (or the device enrolled again since).
        Pending => "pending",
        Active => "active",
        /// The device left management: the channel receives no commands.
        CheckedOut => "checked-out",
    }
}

states! {
    /// What APNs last said about a channel's push token (`mdm_enrollments.push_status`).
    PushStatus ("push status") {
        /// Not pushed since the last TokenUpdate.
        Unknown => "unknown",
        Ok => "ok",
        /// APNs said the token is dead: no more pushes until a TokenUpdate.
        Unregistered => "unregistered",
    }
}

states! {
    /// Which kind of command channel (`mdm_enrollments.channel`).
    ChannelType ("channel type") {
        Device => "device",
        /// A user channel on a device (macOS users, shared iPad).
        User => "user",
    }
}

states! {
    /// Where an issued certificate stands (`certificates.status`). An expired certificate is
    /// still `valid` here: expiry is a matter of `not_after`.
    CertificateStatus ("certificate status") {
        Valid => "valid",
        Revoked => "revoked",
    }
}

states! {
    /// Where an enrollment record (`enrollments.status`) stands.
    EnrollmentStatus ("enrollment status") {
        /// Issued (challenge, profile), no device bound yet.
        Pending => "pending",
        /// Bound to a device by an Authenticate with one of its certificates.
        Active => "active",
        /// Over: its certificates revoked, its device's queue cancelled.
        Retired => "retired",
        /// Recorded for another MDM's device certificate, no device bound yet.
        Migrated => "migrated",
    }
}

impl EnrollmentStatus {
    /// Not bound to any device and not retired: its certificate may enroll a device.
    pub fn is_fresh(self) -> bool {
        matches!(self, EnrollmentStatus::Pending | EnrollmentStatus::Migrated)
    }
}

states! {
    /// Why an enrollment ended (`enrollments.retired_reason`).
    RetirementReason ("retirement reason") {
        /// The device authenticated with a fresh enrollment record, which replaced this one.
        Reenrolled => "re-enrolled",
        /// An admin retired it (API or command line).
        Retired => "retired",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `('a', 'b')`: how a set of states is written in SQL.
    fn sql_set(states: &[impl fmt::Display]) -> String {
        let quoted: Vec<String> = states.iter().map(|s| format!("'{s}'")).collect();
        format!("({})", quoted.join(", "))
    }

    fn round_trips<T>(all: &[T])
    where
        T: Copy + fmt::Debug + PartialEq + Serialize + FromStr + TryFrom<String> + fmt::Display,
        <T as FromStr>::Err: fmt::Debug,
        <T as TryFrom<String>>::Error: fmt::Debug,
    {
        for &state in all {
            let text = state.to_string();
            assert_eq!(text.parse::<T>().unwrap(), state);
            assert_eq!(T::try_from(text.clone()).unwrap(), state);
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::json!(text)
            );
        }
        assert!("no-such-state".parse::<T>().is_err());
        assert!(T::try_from(String::new()).is_err());
    }

    #[test]
    fn states_map_to_their_text_and_back() {
        round_trips(CommandStatus::ALL);
        round_trips(ChannelStatus::ALL);
        round_trips(PushStatus::ALL);
        round_trips(ChannelType::ALL);
        round_trips(CertificateStatus::ALL);
        round_trips(EnrollmentStatus::ALL);
        round_trips(RetirementReason::ALL);
    }

    #[test]
    fn the_database_spelling_is_the_api_spelling() {
        let spelled: Vec<&str> = CommandStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            spelled,
            [
                "queued",
                "sent",
                "acknowledged",
                "error",
                "not-now",
                "format-error",
                "cancelled"
            ]
        );
        assert_eq!(ChannelStatus::CheckedOut.as_str(), "checked-out");
        assert_eq!(PushStatus::Unregistered.as_str(), "unregistered");
        assert_eq!(RetirementReason::Reenrolled.as_str(), "re-enrolled");
    }

    #[test]
    fn sql_sets_are_the_enum_sets() {
        assert_eq!(pending_commands_sql!(), sql_set(&CommandStatus::PENDING));
        assert_eq!(offered_commands_sql!(), sql_set(&CommandStatus::OFFERED));
    }

    #[tokio::test]
    async fn states_bind_and_decode_as_text() {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
        for &status in CommandStatus::ALL {
            let (back, text): (CommandStatus, String) = sqlx::query_as("SELECT $1, $1")
                .bind(status)
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!((back, text.as_str()), (status, status.as_str()));
        }
        let unknown = sqlx::query_scalar::<_, ChannelStatus>("SELECT 'bound'")
            .fetch_one(&pool)
            .await;
        let error = unknown.unwrap_err().to_string();
        assert!(error.contains("unknown channel status 'bound'"), "{error}");
        let missing: Option<PushStatus> = sqlx::query_scalar("SELECT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(missing, None);
    }

    #[test]
    fn fresh_enrollments_are_the_claimable_ones() {
        let fresh: Vec<_> = EnrollmentStatus::ALL
            .iter()
            .copied()
            .filter(|s| s.is_fresh())
            .collect();
        assert_eq!(
            fresh,
            [EnrollmentStatus::Pending, EnrollmentStatus::Migrated],
            "the claim in authenticate_device binds exactly these"
        );
    }
}

states! {
    /// What a managed item is (`managed_items.kind`).
    ItemKind ("managed item kind") {
        /// A configuration profile, keyed by its PayloadIdentifier.
        Profile => "profile",
        /// An app, keyed by its bundle identifier.
        App => "app",
        /// A command a policy sends once each time a device comes into its scope.
        Join => "join",
        /// Whether the device is in a policy's scope (no command of its own).
        Scope => "scope",
        /// A lock or wipe a policy does on leave, waiting for its grace period.
        Deprovision => "deprovision",
        /// The device's identity certificate, renewed (a fresh SCEP payload) before it expires.
        Identity => "identity",
        /// A ProfileList or ManagedApplicationList, asked for when the last report is stale.
        Inventory => "inventory",
    }
}

states! {
    /// The last thing the reconciler did to a managed item (`managed_items.action`).
    ItemAction ("managed item action") {
        /// Installed it (InstallProfile, InstallApplication).
        Install => "install",
        /// Installed a new version of it.
        Update => "update",
        /// Sent an app's new managed configuration alone (Settings).
        Configure => "configure",
        /// Removed it (RemoveProfile, RemoveApplication), or stopped wanting it.
        Remove => "remove",
        /// Sent a policy's command on join.
        Run => "run",
        /// The device came into a policy's scope.
        Enter => "enter",
        /// The device left a policy's scope.
        Leave => "leave",
        /// A deprovisioning action is waiting for its grace period.
        Schedule => "schedule",
        /// A waiting deprovisioning action was called off (the device came back in scope).
        Cancel => "cancel",
        /// Sent DeviceLock.
        Lock => "lock",
        /// Sent EraseDevice.
        Wipe => "wipe",
    }
}

states! {
    /// Whether the directory still knows a person (`users.status`).
    AccountStatus ("account status") {
        Active => "active",
        Disabled => "disabled",
        Deleted => "deleted",
    }
}

states! {
    /// Where a shared app-config token's value came from (`shared_tokens.source`).
    TokenSource ("token source") {
        /// Made by the broker (256 random bits).
        Generated => "generated",
        /// Typed in from the vendor's own portal.
        Imported => "imported",
    }
}
