//! The `trustbroker` command line: wiring only.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use trustbroker::admin::keys;
use trustbroker::audit;
use trustbroker::config::{Config, ConfigArgs, Database};
use trustbroker::pki::ca::CertificateAuthority;
use trustbroker::pki::challenge::{self, ChallengeRequest};
use trustbroker::store::NewAuditEntry;
use trustbroker::tokens::shared::{IntegrationRequest, TokenError, TokenRequest, TokenService};
use trustbroker::{pki, server, tls};

/// mimalloc instead of glibc's malloc: at 100,000 devices glibc's per-thread arenas held twice
/// the live heap (`trustbroker::allocator`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "trustbroker",
    version,
    about = "Identity-integrated MDM trust broker"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (HTTPS, plus plain HTTP with --http-listen).
    Serve,
    /// Bring the database schema up to date and exit; with --check, only say where it stands.
    Migrate {
        /// Change nothing: print whether the database is behind, equal to or ahead of this
        /// binary's migrations (exit 0 equal, 10 behind, 11 ahead, 12 diverged).
        #[arg(long)]
        check: bool,
    },
    /// Write a consistent copy of the serving SQLite database to FILE (PostgreSQL: pg_dump).
    Backup {
        /// Where to write the copy; must not exist yet.
        file: std::path::PathBuf,
    },
    /// Manage admin API keys.
    #[command(subcommand)]
    AdminKey(AdminKeyCommand),
    /// The certificate authority: create, import, show.
    #[command(subcommand)]
    Ca(CaCommand),
    /// SCEP enrollment helpers.
    #[command(subcommand)]
    Scep(ScepCommand),
    /// The APNs push certificate (its topic goes into enrollment profiles).
    #[command(subcommand)]
    PushCert(PushCertCommand),
    /// Identity providers (`[idp.NAME]` in the configuration file).
    #[command(subcommand)]
    Idp(IdpCommand),
    /// Device enrollments: retire one, show a device's history.
    #[command(subcommand)]
    Enrollment(EnrollmentCommand),
    /// Group-driven policy: validate, plan and apply a policy directory.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The keys that sign per-device tokens (published at /.well-known/jwks.json).
    #[command(subcommand)]
    SigningKey(SigningKeyCommand),
    /// App-config tokens (the PingID pattern): integrations and their shared tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Credentials of an app's back end that validates tokens (POST /validate/v1/tokens).
    #[command(subcommand)]
    AppClient(AppClientCommand),
    /// SCIM 2.0 clients: an identity provider's credential for /scim/v2.
    #[command(subcommand)]
    ScimClient(ScimClientCommand),
}

#[derive(Subcommand)]
enum ScimClientCommand {
    /// Create a client of a configured provider; the token is printed alone on the last line.
    Create {
        /// The `[idp.NAME]` whose people and groups the client provisions.
        #[arg(long)]
        provider: String,
        #[arg(long, default_value = "scim")]
        name: String,
    },
    /// List clients (never their secrets).
    List,
    /// Revoke the active client with this id.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Integrations: an app and the managed app configuration key its token goes under.
    #[command(subcommand)]
    Integration(IntegrationCommand),
    /// Generate a token (256 random bits); the value is printed alone on the last line, once.
    Create {
        #[command(flatten)]
        new: NewTokenArgs,
    },
    /// Import a token made in the vendor's portal. The value is read from the environment
    /// variable TRUSTBROKER_TOKEN_VALUE or from stdin, never from a flag (flags show in `ps`).
    Import {
        #[command(flatten)]
        new: NewTokenArgs,
    },
    /// An integration's tokens (the last four characters of each, never the value).
    List {
        #[arg(long)]
        integration: String,
    },
    /// A new token effective now; the current one stays valid for the integration's overlap.
    Rotate {
        #[arg(long)]
        integration: String,
        #[arg(long)]
        label: Option<String>,
        /// Rotate to an imported value (read as for `token import`) instead of a generated one.
        #[arg(long)]
        import: bool,
    },
    /// Revoke a token at once. The only active token of an integration needs --force.
    Revoke {
        #[arg(long)]
        integration: String,
        id: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
struct NewTokenArgs {
    #[arg(long)]
    integration: String,
    #[arg(long)]
    label: Option<String>,
    /// When it becomes valid (RFC 3339); now when not given.
    #[arg(long, value_name = "TIME")]
    not_before: Option<chrono::DateTime<chrono::Utc>>,
    /// When it stops being valid (RFC 3339); never when not given.
    #[arg(long, value_name = "TIME")]
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Subcommand)]
enum IntegrationCommand {
    Create {
        /// Lowercase letters, digits, '-' and '_' (used in URLs and as ${token.NAME}).
        #[arg(long)]
        name: String,
        #[arg(long)]
        display_name: Option<String>,
        /// The app's bundle identifier.
        #[arg(long)]
        bundle_id: String,
        /// The managed app configuration key the token goes under, e.g. PINGID_MDM_TOKEN.
        #[arg(long)]
        config_key: String,
        /// Also give each device a signed per-device token.
        #[arg(long)]
        device_tokens: bool,
        /// How long a rotated-out token stays valid [default: 7 days].
        #[arg(long, value_name = "SECONDS")]
        overlap_secs: Option<i64>,
    },
    List,
    /// Delete an integration: its tokens, app clients and per-device tokens are revoked.
    /// Refused while the applied policies deliver it or it has an active token, unless --force.
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum AppClientCommand {
    /// Create a client; its ID and secret are printed on the last two lines, once.
    Create {
        #[arg(long)]
        integration: String,
        /// [default: the integration's name]
        #[arg(long)]
        name: Option<String>,
    },
    List {
        #[arg(long)]
        integration: String,
    },
    Revoke {
        #[arg(long)]
        integration: String,
        id: String,
    },
}

#[derive(Subcommand)]
enum SigningKeyCommand {
    /// List the keys: next (published, not signing yet), current (signing), retired
    /// (published while tokens it signed live).
    List,
    /// The next key starts signing, the current one retires, a new next key is published.
    Rotate {
        /// Rotate even though the next key was published less than the JWKS cache time ago
        /// (after a key compromise: verifiers that cached the JWKS refuse new tokens until
        /// they fetch it again).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check the policy files (syntax, Apple's payload schemas, variables, conflicts); each
    /// problem is printed as file:line:column.
    Validate {
        #[arg(default_value = "policies")]
        dir: std::path::PathBuf,
    },
    /// What applying the directory would do: devices entering and leaving each policy, the
    /// commands that would be queued, destructive actions apart.
    Plan {
        #[arg(default_value = "policies")]
        dir: std::path::PathBuf,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Record the directory as the next policy version; the reconcilers queue what it takes.
    /// Refused when the plan locks or wipes devices, unless --allow-destructive.
    Apply {
        #[arg(default_value = "policies")]
        dir: std::path::PathBuf,
        #[command(flatten)]
        remote: RemoteArgs,
        #[arg(long)]
        allow_destructive: bool,
        /// The policy repository's commit, recorded with the version.
        #[arg(long, value_name = "SHA")]
        git_commit: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// A running broker to plan or apply against, instead of the configured database. The admin
/// key (scope policies:read to plan, policies:write to apply) comes from TRUSTBROKER_ADMIN_KEY.
#[derive(clap::Args)]
struct RemoteArgs {
    /// The broker's base URL, e.g. https://mdm.example.org.
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// PEM certificates to trust for the server (its generated TLS certificate, say).
    #[arg(long, value_name = "FILE", requires = "server")]
    server_ca: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum EnrollmentCommand {
    /// Retire an enrollment (an enrollment record ID, or a device's UDID for its current one):
    /// revoke its certificates, cancel its queued commands, clear its push tokens. The device
    /// is refused on both MDM channels from its next request, on every node.
    Retire { id: String },
    /// A device's enrollments, oldest first.
    History { udid: String },
}

#[derive(Subcommand)]
enum IdpCommand {
    /// List the configured providers and the URLs to register at each.
    List,
    /// Check a provider's configuration and connectivity, and say what is wrong.
    Test { name: String },
}

#[derive(Subcommand)]
enum PushCertCommand {
    /// Import the MDM push certificate and its RSA key: PEM files (--cert, --key) or a
    /// PKCS#12 file as Keychain Access exports it (--p12; its password from the environment
    /// variable TRUSTBROKER_P12_PASSWORD). Replaces the current one.
    Import {
        #[arg(long, requires = "key", required_unless_present = "p12")]
        cert: Option<std::path::PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<std::path::PathBuf>,
        #[arg(long, conflicts_with_all = ["cert", "key"])]
        p12: Option<std::path::PathBuf>,
    },
    /// Show the push certificate's topic and expiry.
    Show,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the CA (serve does this at first start); does nothing if one exists.
    Init,
    /// Import an existing CA, or an intermediate under an enterprise root, with its key.
    Import {
        /// CA certificate (PEM).
        #[arg(long)]
        cert: std::path::PathBuf,
        /// CA private key (PEM): RSA (PKCS#8 or PKCS#1) or ECDSA P-256 (PKCS#8 or SEC1 "EC
        /// PRIVATE KEY"; needs an RSA RA).
        #[arg(long)]
        key: std::path::PathBuf,
        /// RA certificate (PEM) that receives SCEP envelopes and signs replies; its key is RSA.
        /// Optional for an RSA CA, required for a P-256 one.
        #[arg(long, requires = "ra_key")]
        ra_cert: Option<std::path::PathBuf>,
        /// The RA's private key (PEM).
        #[arg(long, requires = "ra_cert")]
        ra_key: Option<std::path::PathBuf>,
    },
    /// Print the CA certificate (PEM) and its SHA-256 fingerprint.
    Show,
}

#[derive(Subcommand)]
enum ScepCommand {
    /// Create a one-time challenge bound to a new enrollment record; prints JSON.
    Challenge {
        /// The user the device is for.
        #[arg(long)]
        for_user: Option<String>,
        /// The device, if known (serial number, asset tag).
        #[arg(long)]
        for_device: Option<String>,
    },
}

#[derive(Subcommand)]
enum AdminKeyCommand {
    /// Create a key; the key itself is printed alone on the last line of stdout.
    Create {
        #[arg(long)]
        name: String,
        /// A scope to grant (repeatable); without any, the key gets `admin`.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke the active key with this name.
    Revoke { name: String },
}

fn main() -> ExitCode {
    trustbroker::allocator::pad_glibc_heaps();
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    trustbroker::telemetry::init_logging(config.log_format, &config.log_level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        // Policy runs end in more than success or failure (refused, invalid files).
        Command::Policy(cmd) => policy(cmd, config).await,
        Command::Migrate { check: true } => migrate_check(config).await,
        other => run_to_end(other, config).await.map(|()| ExitCode::SUCCESS),
    }
}

/// `migrate --check`: where the schema stands, as text and as the exit code.
async fn migrate_check(config: Config) -> anyhow::Result<ExitCode> {
    if let trustbroker::config::Database::Sqlite { path } = &config.database
        && !path.exists()
    {
        // Opening would create it: a check changes nothing.
        println!("behind: there is no database at {} yet", path.display());
        return Ok(ExitCode::from(10));
    }
    let store = server::connect_store(&config).await?;
    let status = store.schema_status().await?;
    println!("{} ({})", status.describe(), store.backend().as_str());
    Ok(ExitCode::from(status.exit_code()))
}

async fn backup(file: &std::path::Path, config: Config) -> anyhow::Result<()> {
    let store = server::connect_store(&config).await?;
    let report = store.backup_sqlite(file).await?;
    let key = match &config.secret_key {
        trustbroker::config::SecretKeySource::File(path) => {
            format!("the master key file {}", path.display())
        }
        trustbroker::config::SecretKeySource::Value(_) => {
            "the master key (TRUSTBROKER_SECRET_KEY)".to_string()
        }
    };
    println!(
        "backed up {} bytes to {}",
        report.bytes,
        report.path.display()
    );
    eprintln!(
        "note: the CA key, the push key, tokens and other sealed secrets in this copy can only \
         be read with {key}; it is not in the backup. Keep a copy of the key apart from the \
         backup (docs/operations.md, \"Backups\")."
    );
    Ok(())
}

async fn run_to_end(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::Backup { file } => backup(&file, config).await,
        Command::Migrate { .. } => {
            let store = server::open_store(&config).await?;
            println!(
                "database schema is up to date ({})",
                store.backend().as_str()
            );
            Ok(())
        }
        Command::AdminKey(cmd) => admin_key(cmd, config).await,
        Command::Ca(cmd) => ca(cmd, config).await,
        Command::Scep(cmd) => scep(cmd, config).await,
        Command::PushCert(cmd) => push_cert(cmd, config).await,
        Command::Idp(cmd) => idp(cmd, config).await,
        Command::Enrollment(cmd) => enrollment(cmd, config).await,
        Command::SigningKey(cmd) => signing_key(cmd, config).await,
        Command::Token(cmd) => token(cmd, config).await,
        Command::AppClient(cmd) => app_client(cmd, config).await,
        Command::ScimClient(cmd) => scim_client(cmd, config).await,
        Command::Policy(_) => Ok(()),
    }
}

async fn idp(cmd: IdpCommand, config: Config) -> anyhow::Result<()> {
    use trustbroker::identity::{IdentityProviders, Provider, oidc_callback_url, saml_endpoints};
    let public_url = config.public_url_for(config.listen);
    let providers = IdentityProviders::from_config(&config.identity_providers, &public_url)?;
    match cmd {
        IdpCommand::List => {
            if providers.is_empty() {
                println!("no identity providers configured ([idp.NAME] in the config file)");
            }
            for p in providers.iter() {
                match &p.provider {
                    Provider::Ldap(_) => println!("{}\tldap\t{}", p.name, p.label),
                    Provider::Oidc(_) => println!(
                        "{}\toidc\t{}\tredirect URI {}",
                        p.name,
                        p.label,
                        oidc_callback_url(&public_url, &p.name)
                    ),
                    Provider::Saml(_) => {
                        let sp = saml_endpoints(&public_url, &p.name);
                        println!(
                            "{}\tsaml\t{}\tentity ID and metadata {}\tACS {}",
                            p.name, p.label, sp.metadata_url, sp.acs_url
                        );
                    }
                }
            }
            Ok(())
        }
        IdpCommand::Test { name } => {
            let Some(p) = providers.get(&name) else {
                let names: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
                anyhow::bail!(
                    "no identity provider named '{name}' (configured: {})",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                );
            };
            let lines = match &p.provider {
                Provider::Ldap(ldap) => ldap.check().await,
                Provider::Oidc(oidc) => oidc.check().await,
                Provider::Saml(slot) => match slot.get().await {
                    Ok(saml) => Ok(saml.check()),
                    Err(e) => Err(e),
                },
            };
            match lines {
                Ok(lines) => {
                    for line in lines {
                        println!("ok: {line}");
                    }
                    println!("{name}: ready");
                    Ok(())
                }
                Err(e) => anyhow::bail!("{name}: {e}"),
            }
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let database = config.database.clone();
    // Registered before anything listens: a SIGTERM that arrives as soon as the first request
    // is answered must drain, not kill the process by the default action.
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let running = server::start(config).await?;
    println!("trustbroker {} listening", env!("CARGO_PKG_VERSION"));
    println!("  https:      https://{}", running.https_addr);
    if let Some(addr) = running.http_addr {
        println!("  http:       http://{addr}");
    }
    println!("  public URL: {}", running.public_url);
    println!("  database:   {database:?}");
    println!(
        "  TLS certificate{}: {}",
        if running.tls_generated {
            " (generated for development)"
        } else {
            ""
        },
        running.tls_cert_path.display()
    );
    println!("  TLS SHA-256 fingerprint: {}", running.tls_fingerprint);
    let db_flag = match database {
        Database::Sqlite { .. } => format!("--data-dir {}", data_dir.display()),
        Database::Postgres { .. } => "--database-url \"$DATABASE_URL\"".to_string(),
    };
    println!("  admin key:  trustbroker admin-key create --name NAME {db_flag}");
    tracing::info!(https = %running.https_addr, "serving");
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    tracing::info!("shutting down: draining connections");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn admin_key(cmd: AdminKeyCommand, config: Config) -> anyhow::Result<()> {
    let store = server::open_store(&config).await?;
    let actor = audit::cli_actor();
    match cmd {
        AdminKeyCommand::Create { name, scopes } => {
            let scopes = keys::parse_scopes(&scopes)?;
            match keys::create(&store, &name, &scopes, &actor).await {
                Ok(issued) => {
                    let mut entry =
                        cli_entry("admin-key.create", Some(&name), audit::OUTCOME_SUCCESS);
                    entry.detail = Some(
                        serde_json::json!({"id": issued.id, "scopes": issued.scopes}).to_string(),
                    );
                    audit::record(&store, entry).await;
                    println!(
                        "created admin key '{}' (id {}) with scopes: {}",
                        issued.name,
                        issued.id,
                        issued.scopes.join(" ")
                    );
                    println!("store it now: it is shown only once");
                    println!("{}", issued.key);
                }
                Err(e) => {
                    let entry = cli_entry("admin-key.create", Some(&name), audit::OUTCOME_FAILURE);
                    audit::record(&store, entry).await;
                    return Err(e).context("creating the admin key");
                }
            }
        }
        AdminKeyCommand::List => {
            let keys = keys::list(&store).await?;
            println!(
                "{:<24} {:<12} {:<8} {:<25} SCOPES",
                "NAME", "ID", "STATUS", "CREATED"
            );
            for key in keys {
                let status = if key.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:<24} {:<12} {:<8} {:<25} {}",
                    key.name,
                    key.id,
                    status,
                    key.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
                    key.scopes.join(" ")
                );
            }
        }
        AdminKeyCommand::Revoke { name } => match keys::revoke(&store, &name).await {
            Ok(id) => {
                let mut entry = cli_entry("admin-key.revoke", Some(&name), audit::OUTCOME_SUCCESS);
                entry.detail = Some(serde_json::json!({"id": id}).to_string());
                audit::record(&store, entry).await;
                println!("revoked admin key '{name}' (id {id})");
            }
            Err(e) => {
                let entry = cli_entry("admin-key.revoke", Some(&name), audit::OUTCOME_FAILURE);
                audit::record(&store, entry).await;
                return Err(e).context("revoking the admin key");
            }
        },
    }
    store.close().await;
    Ok(())
}

async fn policy(cmd: PolicyCommand, config: Config) -> anyhow::Result<ExitCode> {
    use trustbroker::policy::cli::{self, ApplyOptions, Outcome, Target};
    let target = |remote: RemoteArgs| -> anyhow::Result<Target> {
        Ok(match remote.server {
            None => Target::Local(Box::new(config.clone())),
            Some(url) => Target::Remote {
                url,
                admin_key: std::env::var("TRUSTBROKER_ADMIN_KEY").context(
                    "--server needs an admin key in the environment variable \
                     TRUSTBROKER_ADMIN_KEY",
                )?,
                ca_file: remote.server_ca,
            },
        })
    };
    let outcome = match cmd {
        PolicyCommand::Validate { dir } => cli::validate(&dir),
        PolicyCommand::Plan { dir, remote, json } => {
            cli::run(target(remote)?, &dir, None, json).await?
        }
        PolicyCommand::Apply {
            dir,
            remote,
            allow_destructive,
            git_commit,
            json,
        } => {
            let options = ApplyOptions {
                allow_destructive,
                git_commit,
            };
            cli::run(target(remote)?, &dir, Some(options), json).await?
        }
    };
    Ok(match outcome {
        Outcome::Ok => ExitCode::SUCCESS,
        Outcome::Refused => ExitCode::from(1),
        Outcome::Invalid => ExitCode::from(2),
    })
}

async fn signing_key(cmd: SigningKeyCommand, config: Config) -> anyhow::Result<()> {
    use trustbroker::tokens::device;
    let store = server::open_store(&config).await?;
    let master = server::load_master_key(&config)?;
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(|| "-".into())
    };
    match cmd {
        SigningKeyCommand::List => {
            let keys = device::list_signing_keys(&store).await?;
            println!(
                "{:<44} {:<8} {:<9} {:<21} {:<21} RETIRED",
                "KID", "STATUS", "PUBLISHED", "CREATED", "SIGNING SINCE"
            );
            for key in keys {
                println!(
                    "{:<44} {:<8} {:<9} {:<21} {:<21} {}",
                    key.kid,
                    key.status.as_str(),
                    if key.published { "yes" } else { "no" },
                    time(Some(key.created_at)),
                    time(key.activated_at),
                    time(key.retired_at)
                );
            }
        }
        SigningKeyCommand::Rotate { force } => {
            let action = trustbroker::admin::signing_keys::AUDIT_ROTATE;
            match device::rotate_signing_keys(&store, &master, force).await {
                Ok(rotation) => {
                    let mut entry =
                        cli_entry(action, Some(&rotation.current), audit::OUTCOME_SUCCESS);
                    entry.detail =
                        Some(serde_json::json!({"rotation": rotation, "force": force}).to_string());
                    audit::record(&store, entry).await;
                    println!(
                        "rotated: {} signs now; {} retired (published while its tokens live); \
                         {} published as the next key",
                        rotation.current, rotation.retired, rotation.next
                    );
                }
                Err(e) => {
                    let mut entry = cli_entry(action, None, audit::OUTCOME_FAILURE);
                    entry.detail = Some(
                        serde_json::json!({"error": e.to_string(), "force": force}).to_string(),
                    );
                    audit::record(&store, entry).await;
                    store.close().await;
                    return Err(e.into());
                }
            }
        }
    }
    store.close().await;
    Ok(())
}

async fn enrollment(cmd: EnrollmentCommand, config: Config) -> anyhow::Result<()> {
    use trustbroker::apple::lifecycle;
    let store = server::open_store(&config).await?;
    match cmd {
        EnrollmentCommand::Retire { id } => {
            anyhow::ensure!(
                lifecycle::valid_id(&id),
                "an enrollment ID is 1 to 256 printable characters"
            );
            let by = trustbroker::store::RetireRequest {
                actor: audit::cli_actor(),
                source: Some("cli".into()),
                request_id: None,
            };
            match lifecycle::retire(&store, &id, &by).await? {
                Some(r) if r.already_retired => println!(
                    "enrollment {} was already retired{}: nothing changed",
                    r.enrollment_id,
                    r.retired_at
                        .map(|at| format!(" (at {})", at.format("%Y-%m-%dT%H:%M:%SZ")))
                        .unwrap_or_default()
                ),
                Some(r) => println!(
                    "retired enrollment {} (device {}): {} certificate(s) revoked, {} command(s) \
                     cancelled",
                    r.enrollment_id,
                    r.udid.as_deref().unwrap_or("none"),
                    r.certificates_revoked,
                    r.commands_cancelled
                ),
                None => {
                    let entry = cli_entry(
                        trustbroker::store::AUDIT_RETIRE,
                        Some(&id),
                        audit::OUTCOME_FAILURE,
                    );
                    audit::record(&store, entry).await;
                    store.close().await;
                    anyhow::bail!("no enrollment record or enrollment (channel) with ID {id}");
                }
            }
        }
        EnrollmentCommand::History { udid } => {
            let history = store.enrollment_history(&udid).await?;
            anyhow::ensure!(
                !history.is_empty(),
                "no enrollment history for device {udid}"
            );
            let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                    .unwrap_or_else(|| "-".into())
            };
            println!(
                "{:<38} {:<9} {:<38} {:<21} {:<21} REASON",
                "ENROLLMENT", "STATUS", "OWNER", "STARTED", "RETIRED"
            );
            for span in history {
                println!(
                    "{:<38} {:<9} {:<38} {:<21} {:<21} {}",
                    span.id,
                    span.status.as_str(),
                    span.owner_id.as_deref().unwrap_or("-"),
                    time(span.started_at),
                    time(span.retired_at),
                    span.retired_reason.map_or("-", |r| r.as_str())
                );
            }
        }
    }
    store.close().await;
    Ok(())
}

async fn scim_client(cmd: ScimClientCommand, config: Config) -> anyhow::Result<()> {
    use trustbroker::scim::auth;
    let store = server::open_store(&config).await?;
    match cmd {
        ScimClientCommand::Create { provider, name } => {
            // A client of a provider no one configured would provision people no sign-in finds.
            if !config
                .identity_providers
                .iter()
                .any(|(n, _)| *n == provider)
            {
                anyhow::bail!("no identity provider '{provider}' is configured ([idp.{provider}])");
            }
            let result = auth::create(&store, &provider, &name, &audit::cli_actor()).await;
            let outcome = if result.is_ok() {
                audit::OUTCOME_SUCCESS
            } else {
                audit::OUTCOME_FAILURE
            };
            let mut entry = cli_entry("scim-client.create", Some(&name), outcome);
            if let Ok(issued) = &result {
                entry.detail =
                    Some(serde_json::json!({"id": issued.id, "provider": provider}).to_string());
            }
            audit::record(&store, entry).await;
            let issued = result.context("creating the SCIM client")?;
            println!(
                "created SCIM client '{}' (id {}) for provider '{}'",
                issued.name, issued.id, issued.provider
            );
            println!("store it now: it is shown only once");
            println!("{}", issued.token);
        }
        ScimClientCommand::List => {
            println!(
                "{:<12} {:<20} {:<20} {:<8} {:<25} LAST USED",
                "ID", "PROVIDER", "NAME", "STATUS", "CREATED"
            );
            for client in store.list_scim_clients().await? {
                let status = if client.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:<12} {:<20} {:<20} {:<8} {:<25} {}",
                    client.id,
                    client.provider,
                    client.name,
                    status,
                    client.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
                    client
                        .last_used_at
                        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                        .unwrap_or_else(|| "never".into())
                );
            }
        }
        ScimClientCommand::Revoke { id } => {
            let result = auth::revoke(&store, &id).await;
            let outcome = if result.is_ok() {
                audit::OUTCOME_SUCCESS
            } else {
                audit::OUTCOME_FAILURE
            };
            audit::record(&store, cli_entry("scim-client.revoke", Some(&id), outcome)).await;
            let revoked = result.context("revoking the SCIM client")?;
            println!(
                "revoked SCIM client '{}' (id {}) of provider '{}'",
                revoked.name, revoked.id, revoked.provider
            );
        }
    }
    store.close().await;
    Ok(())
}

fn cli_entry(action: &str, target: Option<&str>, outcome: &str) -> NewAuditEntry {
    NewAuditEntry {
        actor: audit::cli_actor(),
        action: action.to_string(),
        target: target.map(str::to_string),
        outcome: outcome.to_string(),
        source: Some("cli".into()),
        ..Default::default()
    }
}

async fn ca(cmd: CaCommand, config: Config) -> anyhow::Result<()> {
    let store = server::open_store(&config).await?;
    let master = server::load_master_key(&config)?;
    match cmd {
        CaCommand::Init => {
            let existed = CertificateAuthority::load(&store, &master, &config.pki)
                .await?
                .is_some();
            let ca = CertificateAuthority::load_or_create(&store, &master, &config.pki).await?;
            if !existed {
                audit::record(
                    &store,
                    cli_entry("ca.init", Some("ca"), audit::OUTCOME_SUCCESS),
                )
                .await;
            }
            println!(
                "{} CA, SHA-256 fingerprint {}",
                if existed { "existing" } else { "created" },
                tls::fingerprint(&ca.ca.certificate_der)
            );
        }
        CaCommand::Import {
            cert,
            key,
            ra_cert,
            ra_key,
        } => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let (cert_pem, key_pem) = (read(&cert)?, read(&key)?);
            let ra = match (ra_cert, ra_key) {
                (Some(c), Some(k)) => Some((read(&c)?, read(&k)?)),
                _ => None,
            };
            let result = pki::ca::import(
                &store,
                &master,
                &cert_pem,
                &key_pem,
                ra.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
            )
            .await;
            let outcome = if result.is_ok() {
                audit::OUTCOME_SUCCESS
            } else {
                audit::OUTCOME_FAILURE
            };
            audit::record(&store, cli_entry("ca.import", Some("ca"), outcome)).await;
            result.context("importing the CA")?;
            println!("imported the CA from {}", cert.display());
        }
        CaCommand::Show => {
            let ca = CertificateAuthority::load(&store, &master, &config.pki)
                .await?
                .context("there is no CA yet: run 'trustbroker ca init' or start the server")?;
            println!("CA key: {}", ca.ca.algorithm().as_str());
            println!(
                "SHA-256 fingerprint: {}",
                tls::fingerprint(&ca.ca.certificate_der)
            );
            print!("{}", pki::pem("CERTIFICATE", &ca.ca.certificate_der));
            if let Some(ra) = &ca.ra {
                println!(
                    "RA SHA-256 fingerprint: {}",
                    tls::fingerprint(&ra.certificate_der)
                );
                print!("{}", pki::pem("CERTIFICATE", &ra.certificate_der));
            }
        }
    }
    store.close().await;
    Ok(())
}

async fn scep(cmd: ScepCommand, config: Config) -> anyhow::Result<()> {
    let store = server::open_store(&config).await?;
    match cmd {
        ScepCommand::Challenge {
            for_user,
            for_device,
        } => {
            let issued = challenge::create(
                &store,
                config.pki.challenge_ttl,
                ChallengeRequest {
                    requested_by: audit::cli_actor(),
                    for_user,
                    for_device,
                    user_id: None,
                },
            )
            .await?;
            audit::record(
                &store,
                cli_entry(
                    "scep-challenge.create",
                    Some(&issued.enrollment_id),
                    audit::OUTCOME_SUCCESS,
                ),
            )
            .await;
            println!("{}", serde_json::to_string(&issued)?);
        }
    }
    store.close().await;
    Ok(())
}

async fn push_cert(cmd: PushCertCommand, config: Config) -> anyhow::Result<()> {
    let store = server::open_store(&config).await?;
    match cmd {
        PushCertCommand::Import { cert, key, p12 } => {
            let master = server::load_master_key(&config)?;
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let (cert_pem, key_pem) = match (cert, key, p12) {
                (Some(cert), Some(key), None) => (read(&cert)?, read(&key)?),
                (None, None, Some(p12)) => {
                    let der = std::fs::read(&p12)
                        .with_context(|| format!("reading {}", p12.display()))?;
                    // Never a flag: flags show in `ps`.
                    let password = std::env::var("TRUSTBROKER_P12_PASSWORD").unwrap_or_default();
                    trustbroker::apple::push_cert::pkcs12_to_pem(&der, &password)?
                }
                _ => anyhow::bail!("give --cert and --key, or --p12"),
            };
            let result =
                trustbroker::apple::push_cert::import(&store, &master, &cert_pem, &key_pem).await;
            let (outcome, target) = match &result {
                Ok(imported) => (audit::OUTCOME_SUCCESS, Some(imported.topic.clone())),
                Err(_) => (audit::OUTCOME_FAILURE, None),
            };
            audit::record(
                &store,
                cli_entry("push-cert.import", target.as_deref(), outcome),
            )
            .await;
            let imported = result?;
            println!(
                "imported the push certificate for topic {} (valid until {})",
                imported.topic, imported.not_after
            );
        }
        PushCertCommand::Show => match store.push_certificate().await? {
            Some(push) => println!(
                "topic {}\nvalid until {}\nimported {}",
                push.topic, push.not_after, push.imported_at
            ),
            None => println!("no push certificate imported"),
        },
    }
    Ok(())
}

/// The token service on the configured database, for one command.
async fn token_service(
    config: &Config,
) -> anyhow::Result<(trustbroker::store::Store, TokenService)> {
    let store = server::open_store(config).await?;
    let master = std::sync::Arc::new(server::load_master_key(config)?);
    let service = TokenService::start(store.clone(), master, None, Default::default()).await?;
    Ok((store, service))
}

/// Records a command-line token action: success with `detail`, failure with the error.
async fn audit_token_action<T>(
    store: &trustbroker::store::Store,
    action: &str,
    target: &str,
    result: Result<T, TokenError>,
    detail: impl FnOnce(&T) -> serde_json::Value,
) -> anyhow::Result<T> {
    let (outcome, detail) = match &result {
        Ok(done) => (audit::OUTCOME_SUCCESS, detail(done)),
        Err(e) => (
            audit::OUTCOME_FAILURE,
            serde_json::json!({"error": e.to_string()}),
        ),
    };
    let mut entry = cli_entry(action, Some(target), outcome);
    entry.detail = Some(detail.to_string());
    audit::record(store, entry).await;
    Ok(result?)
}

/// A token value to import: TRUSTBROKER_TOKEN_VALUE, else stdin (one line from a terminal).
fn imported_value() -> anyhow::Result<String> {
    use std::io::{IsTerminal, Read};
    if let Ok(value) = std::env::var("TRUSTBROKER_TOKEN_VALUE")
        && !value.trim().is_empty()
    {
        return Ok(value.trim().to_string());
    }
    let stdin = std::io::stdin();
    let mut value = String::new();
    if stdin.is_terminal() {
        eprintln!("paste the token, then press Enter:");
        stdin.read_line(&mut value)?;
    } else {
        // Bounded: a token is at most a few hundred characters.
        stdin.lock().take(64 * 1024).read_to_string(&mut value)?;
    }
    let value = value.trim().to_string();
    anyhow::ensure!(
        !value.is_empty(),
        "no token value: set TRUSTBROKER_TOKEN_VALUE or pipe it to stdin"
    );
    Ok(value)
}

fn print_tokens(tokens: &[trustbroker::tokens::shared::TokenView]) {
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{:<17} {:<10} {:<3} {:<6} {:<21} {:<21} {:>9} {:>5} LABEL",
        "ID", "STATUS", "CUR", "LAST4", "NOT BEFORE", "EXPIRES", "DELIVERED", "ACKED"
    );
    for t in tokens {
        println!(
            "{:<17} {:<10} {:<3} {:<6} {:<21} {:<21} {:>9} {:>5} {}",
            t.id,
            t.status.as_str(),
            if t.current { "*" } else { "" },
            t.last4,
            time(Some(t.not_before)),
            time(t.expires_at),
            t.delivered,
            t.acknowledged,
            t.label
        );
    }
}

async fn token(cmd: TokenCommand, config: Config) -> anyhow::Result<()> {
    let (store, service) = token_service(&config).await?;
    let actor = audit::cli_actor();
    match cmd {
        TokenCommand::Integration(IntegrationCommand::Create {
            name,
            display_name,
            bundle_id,
            config_key,
            device_tokens,
            overlap_secs,
        }) => {
            let request = IntegrationRequest {
                name: name.clone(),
                display_name,
                bundle_id,
                config_key,
                device_tokens,
                overlap_secs,
            };
            let result = service.create_integration(request, &actor).await;
            let created =
                audit_token_action(&store, "token-integration.create", &name, result, |i| {
                    serde_json::json!({"bundle_id": i.integration.bundle_id,
                        "config_key": i.integration.config_key})
                })
                .await?;
            println!(
                "created integration '{}': app {}, configuration key {}, overlap {} s",
                created.integration.name,
                created.integration.bundle_id,
                created.integration.config_key,
                created.integration.overlap_secs
            );
        }
        TokenCommand::Integration(IntegrationCommand::List) => {
            println!(
                "{:<24} {:<40} {:<24} {:>6} {:>7} CURRENT",
                "NAME", "BUNDLE ID", "CONFIG KEY", "ACTIVE", "CLIENTS"
            );
            for i in service.integrations().await? {
                println!(
                    "{:<24} {:<40} {:<24} {:>6} {:>7} {}",
                    i.integration.name,
                    i.integration.bundle_id,
                    i.integration.config_key,
                    i.active_tokens,
                    i.active_clients,
                    i.current_token.as_deref().unwrap_or("-")
                );
            }
        }
        TokenCommand::Integration(IntegrationCommand::Delete { name, force }) => {
            let result = service.delete_integration(&name, force, &actor).await;
            let deleted = audit_token_action(
                &store,
                "token-integration.delete",
                &name,
                result,
                |d| serde_json::json!({"force": force, "outcome": format!("{d:?}")}),
            )
            .await?;
            if let trustbroker::store::IntegrationDeletion::Deleted {
                tokens_revoked,
                clients_revoked,
                device_tokens_revoked,
            } = deleted
            {
                println!(
                    "deleted integration '{name}': revoked {tokens_revoked} token(s), \
                     {clients_revoked} app client(s), {device_tokens_revoked} device token(s)"
                );
            }
        }
        TokenCommand::Create { new } => create_token(&store, &service, new, None, &actor).await?,
        TokenCommand::Import { new } => {
            let value = imported_value()?;
            create_token(&store, &service, new, Some(value), &actor).await?;
        }
        TokenCommand::List { integration } => print_tokens(&service.tokens(&integration).await?),
        TokenCommand::Rotate {
            integration,
            label,
            import,
        } => {
            let value = if import {
                Some(imported_value()?)
            } else {
                None
            };
            let result = service.rotate(&integration, label, value, &actor).await;
            let rotation = audit_token_action(&store, "token.rotate", &integration, result, |r| {
                serde_json::json!({"id": r.created.token.id, "last4": r.created.token.last4,
                    "previous": r.previous.as_ref().map(|p| &p.id)})
            })
            .await?;
            if let Some(previous) = &rotation.previous {
                println!(
                    "token {} stays valid until {}",
                    previous.id,
                    previous
                        .expires_at
                        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                        .unwrap_or_else(|| "revoked".into())
                );
            }
            println!(
                "token {} (…{}) is current; devices receive it at the next reconcile",
                rotation.created.token.id, rotation.created.token.last4
            );
            if let Some(value) = &rotation.created.value {
                println!("the value is shown only once:");
                println!("{value}");
            }
        }
        TokenCommand::Revoke {
            integration,
            id,
            force,
        } => {
            let result = service.revoke(&integration, &id, force, &actor).await;
            let target = format!("{integration}/{id}");
            let revoked = audit_token_action(
                &store,
                "token.revoke",
                &target,
                result,
                |_| serde_json::json!({"force": force}),
            )
            .await?;
            println!(
                "revoked token {} (…{}) of '{integration}'",
                revoked.id, revoked.last4
            );
        }
    }
    store.close().await;
    Ok(())
}

async fn create_token(
    store: &trustbroker::store::Store,
    service: &TokenService,
    new: NewTokenArgs,
    value: Option<String>,
    actor: &str,
) -> anyhow::Result<()> {
    let action = if value.is_some() {
        "token.import"
    } else {
        "token.create"
    };
    let request = TokenRequest {
        label: new.label,
        value,
        not_before: new.not_before,
        expires_at: new.expires_at,
    };
    let result = service.create_token(&new.integration, request, actor).await;
    let created = audit_token_action(store, action, &new.integration, result, |c| {
        serde_json::json!({"id": c.token.id, "last4": c.token.last4,
            "not_before": c.token.not_before, "expires_at": c.token.expires_at})
    })
    .await?;
    println!(
        "{} token {} (…{}) for '{}': {}",
        if created.value.is_some() {
            "generated"
        } else {
            "imported"
        },
        created.token.id,
        created.token.last4,
        new.integration,
        created.token.status.as_str()
    );
    if let Some(value) = &created.value {
        println!("the value is shown only once:");
        println!("{value}");
    }
    Ok(())
}

async fn app_client(cmd: AppClientCommand, config: Config) -> anyhow::Result<()> {
    let (store, service) = token_service(&config).await?;
    let actor = audit::cli_actor();
    match cmd {
        AppClientCommand::Create { integration, name } => {
            let result = service.create_client(&integration, name, &actor).await;
            let issued = audit_token_action(
                &store,
                "app-client.create",
                &integration,
                result,
                |c| serde_json::json!({"id": c.client.id, "name": c.client.name}),
            )
            .await?;
            println!(
                "created app client '{}' for integration '{integration}'; its back end sends \
                 these as HTTP Basic credentials to POST /validate/v1/tokens",
                issued.client.name
            );
            println!("store the secret now: it is shown only once");
            println!("client_id {}", issued.client.id);
            println!("client_secret {}", issued.client_secret);
        }
        AppClientCommand::List { integration } => {
            println!(
                "{:<21} {:<24} {:<8} {:<21} {:<21} CREATED BY",
                "ID", "NAME", "STATUS", "CREATED", "LAST USED"
            );
            for c in service.clients(&integration).await? {
                println!(
                    "{:<21} {:<24} {:<8} {:<21} {:<21} {}",
                    c.id,
                    c.name,
                    if c.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    },
                    c.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
                    c.last_used_at
                        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                        .unwrap_or_else(|| "never".into()),
                    c.created_by
                );
            }
        }
        AppClientCommand::Revoke { integration, id } => {
            let result = service.revoke_client(&integration, &id, &actor).await;
            let target = format!("{integration}/{id}");
            audit_token_action(
                &store,
                "app-client.revoke",
                &target,
                result,
                |c| serde_json::json!({"name": c.name}),
            )
            .await?;
            println!(
                "revoked app client {id} of '{integration}': refused on every node within a second"
            );
        }
    }
    store.close().await;
    Ok(())
}
