//! Sign-in to profile: how long a person waits from pressing "Sign in" to holding their
//! enrollment profile, per protocol, against a running broker and the real test IdPs; then how
//! many profiles the portal makes per second for signed-in people.
//!
//!   cargo bench --bench signin_load -- --url http://127.0.0.1:8080
//!
//! `benches/signin.sh` starts everything. Each sign-in is a fresh browser (its own cookies),
//! run one after the other: latency is the point. Every profile is checked to be CMS
//! SignedData before it counts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use der::Decode;
use reqwest::StatusCode;
use reqwest::header::{LOCATION, SET_COOKIE};

#[derive(Parser)]
struct Args {
    /// Where the broker answers.
    #[arg(long)]
    url: String,
    /// The broker's public URL, which the IdPs redirect and post to (rewritten to `--url`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    public_url: String,
    /// Protocols to sign in with, by provider name in docs/examples/test-idps.toml.
    #[arg(long, value_delimiter = ',', default_value = "ldap,oidc,saml")]
    protocols: Vec<String>,
    /// Sign-ins per protocol.
    #[arg(long, default_value_t = 30)]
    signins: usize,
    /// Concurrency levels for the profiles-per-second part.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    concurrency: Vec<usize>,
    /// Profiles per concurrency level, shared by its workers. A person may hold at most
    /// `enroll.max_unredeemed_profiles` (at most 1,000) unused profiles per window, and the
    /// workers are the same three people: keep every person under that across the levels.
    #[arg(long, default_value_t = 600)]
    profiles: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const PEOPLE: [(&str, &str); 3] = [("alice", "alicepw"), ("bob", "bobpw"), ("carol", "carolpw")];

/// A browser: cookies by name (every host is 127.0.0.1, and cookies ignore ports), redirects
/// followed by hand so that each hop can be timed and rewritten.
struct Browser {
    client: reqwest::Client,
    cookies: BTreeMap<String, String>,
    public_url: String,
    broker_url: String,
    /// Time spent waiting for the broker, as opposed to the identity provider.
    at_broker: Duration,
}

impl Browser {
    fn new(args: &Args) -> Browser {
        Browser {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
            cookies: BTreeMap::new(),
            public_url: args.public_url.clone(),
            broker_url: args.url.clone(),
            at_broker: Duration::ZERO,
        }
    }

    async fn send(&mut self, request: reqwest::RequestBuilder) -> reqwest::Response {
        let cookies: Vec<String> = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let request = request
            .header("cookie", cookies.join("; "))
            .build()
            .expect("request");
        let to_broker = request.url().as_str().starts_with(&self.broker_url);
        let started = Instant::now();
        let response = self.client.execute(request).await.expect("an answer");
        if to_broker {
            self.at_broker += started.elapsed();
        }
        for value in response.headers().get_all(SET_COOKIE) {
            let text = value.to_str().unwrap_or_default();
            let Some((name, value)) = text.split(';').next().and_then(|p| p.split_once('=')) else {
                continue;
            };
            if value.is_empty() || text.contains("Max-Age=0") {
                self.cookies.remove(name.trim());
            } else {
                self.cookies.insert(name.trim().into(), value.into());
            }
        }
        response
    }

    fn to_broker(&self, url: &str) -> String {
        url.replacen(&self.public_url, &self.broker_url, 1)
    }

    async fn get(&mut self, url: &str) -> reqwest::Response {
        let url = self.to_broker(url);
        let request = self.client.get(url);
        self.send(request).await
    }

    async fn post(&mut self, url: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let url = self.to_broker(url);
        let request = self.client.post(url).form(form);
        self.send(request).await
    }

    /// GETs `url` and follows redirects to a page; stops short of the broker's public URL
    /// (where the identity provider sends the browser back), returning that URL unvisited.
    async fn follow(&mut self, mut url: String) -> (String, String) {
        for _ in 0..10 {
            if url.starts_with(&self.public_url) {
                return (url, String::new());
            }
            let response = self.get(&url).await;
            if !response.status().is_redirection() {
                let body = response.text().await.unwrap_or_default();
                return (url, body);
            }
            url = absolute(&url, &location(&response));
        }
        (url, String::new())
    }
}

fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(LOCATION)
        .and_then(|l| l.to_str().ok())
        .expect("a redirect with a Location")
        .to_owned()
}

fn absolute(base: &str, next: &str) -> String {
    reqwest::Url::parse(base)
        .and_then(|b| b.join(next))
        .map(|u| u.to_string())
        .unwrap_or_else(|_| next.to_owned())
}

/// The `value` of the input named `name` in a page.
fn input(page: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page.find(&marker)? + marker.len();
    let end = page[start..].find('"')? + start;
    Some(
        page[start..end]
            .replace("&quot;", "\"")
            .replace("&#039;", "'")
            .replace("&#39;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// From a signed-in portal session: the profile, checked to be CMS SignedData.
async fn profile(browser: &mut Browser, url: &str) -> Result<(), String> {
    let page = browser
        .get(&format!("{url}/enroll"))
        .await
        .text()
        .await
        .unwrap_or_default();
    let csrf = input(&page, "csrf").ok_or("no session page")?;
    let response = browser
        .post(&format!("{url}/enroll/profile"), &[("csrf", &csrf)])
        .await;
    if response.status() != StatusCode::OK {
        return Err(format!("profile: HTTP {}", response.status()));
    }
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    cms::content_info::ContentInfo::from_der(&body)
        .map(|_| ())
        .map_err(|e| format!("profile is not CMS: {e}"))
}

async fn sign_in(
    browser: &mut Browser,
    protocol: &str,
    user: &str,
    pw: &str,
) -> Result<(), String> {
    let url = browser.broker_url.clone();
    match protocol {
        "ldap" => {
            let page = browser
                .get(&format!("{url}/enroll"))
                .await
                .text()
                .await
                .unwrap_or_default();
            let csrf = input(&page, "csrf").ok_or("no sign-in form")?;
            let form = [("csrf", csrf.as_str()), ("login", user), ("password", pw)];
            let done = browser.post(&format!("{url}/auth/ldap/ldap"), &form).await;
            if done.status() != StatusCode::SEE_OTHER {
                return Err(format!("LDAP sign-in: HTTP {}", done.status()));
            }
        }
        "oidc" => {
            let start = browser.get(&format!("{url}/auth/oidc/oidc/login")).await;
            let (mut at, mut page) = browser.follow(location(&start)).await;
            for _ in 0..3 {
                if at.starts_with(&browser.public_url) {
                    break;
                }
                let action = page
                    .split("action=\"")
                    .nth(1)
                    .and_then(|s| s.split('"').next())
                    .ok_or("no form at the OpenID provider")?
                    .to_owned();
                let fields: Vec<(&str, &str)> = if page.contains("name=\"password\"") {
                    vec![("prompt", "login"), ("login", user), ("password", pw)]
                } else {
                    vec![("prompt", "consent")]
                };
                let posted = browser.post(&absolute(&at, &action), &fields).await;
                (at, page) = browser.follow(absolute(&at, &location(&posted))).await;
            }
            let done = browser.get(&at).await;
            if done.status() != StatusCode::SEE_OTHER {
                return Err(format!("OIDC callback: HTTP {}", done.status()));
            }
        }
        "saml" => {
            let start = browser.get(&format!("{url}/auth/saml/saml/login")).await;
            let (at, page) = browser.follow(location(&start)).await;
            let state = input(&page, "AuthState").ok_or("no SimpleSAMLphp login form")?;
            let mut post_url = reqwest::Url::parse(&at).map_err(|e| e.to_string())?;
            post_url.set_query(None);
            let form = [
                ("username", user),
                ("password", pw),
                ("AuthState", state.as_str()),
            ];
            let posted = browser.post(post_url.as_str(), &form).await;
            let page = if posted.status().is_redirection() {
                browser
                    .follow(absolute(post_url.as_str(), &location(&posted)))
                    .await
                    .1
            } else {
                posted.text().await.unwrap_or_default()
            };
            let response = input(&page, "SAMLResponse").ok_or("no SAMLResponse")?;
            let mut fields = vec![("SAMLResponse", response.as_str())];
            let relay = input(&page, "RelayState");
            if let Some(relay) = &relay {
                fields.push(("RelayState", relay));
            }
            let done = browser
                .post(&format!("{url}/auth/saml/saml/acs"), &fields)
                .await;
            if done.status() != StatusCode::SEE_OTHER {
                return Err(format!("SAML ACS: HTTP {}", done.status()));
            }
        }
        other => return Err(format!("unknown protocol {other}")),
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    println!("| protocol | sign-ins | failed | p50 ms | p90 ms | max ms | at the broker, p50 ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for protocol in &args.protocols {
        let mut total = Vec::new();
        let mut broker = Vec::new();
        let mut failed = 0;
        for i in 0..args.signins {
            let (user, pw) = PEOPLE[i % PEOPLE.len()];
            let mut browser = Browser::new(&args);
            let started = Instant::now();
            let url = args.url.clone();
            let outcome = match sign_in(&mut browser, protocol, user, pw).await {
                Ok(()) => profile(&mut browser, &url).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => {
                    total.push(started.elapsed());
                    broker.push(browser.at_broker);
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("{protocol} sign-in {i} failed: {e}");
                }
            }
        }
        total.sort();
        broker.sort();
        println!(
            "| {protocol} | {} | {failed} | {:.1} | {:.1} | {:.1} | {:.1} |",
            total.len(),
            percentile(&total, 0.5),
            percentile(&total, 0.9),
            percentile(&total, 1.0),
            percentile(&broker, 0.5),
        );
    }

    println!();
    println!("| concurrency | profiles | profiles/s | p50 ms | p99 ms | failures |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let args = Arc::new(args);
    for &concurrency in &args.concurrency {
        let failures = Arc::new(AtomicUsize::new(0));
        let left = Arc::new(AtomicUsize::new(args.profiles));
        let started = Instant::now();
        let workers: Vec<_> = (0..concurrency)
            .map(|w| {
                let args = args.clone();
                let failures = failures.clone();
                let left = left.clone();
                tokio::spawn(async move {
                    let (user, pw) = PEOPLE[w % PEOPLE.len()];
                    let mut browser = Browser::new(&args);
                    if let Err(e) = sign_in(&mut browser, "ldap", user, pw).await {
                        eprintln!("worker {w}: {e}");
                        return Vec::new();
                    }
                    let mut latencies = Vec::new();
                    while left
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        let one = Instant::now();
                        match profile(&mut browser, &args.url).await {
                            Ok(()) => latencies.push(one.elapsed()),
                            Err(e) => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                eprintln!("worker {w}: {e}");
                            }
                        }
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for worker in workers {
            latencies.extend(worker.await.unwrap_or_default());
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort();
        println!(
            "| {concurrency} | {} | {:.0} | {:.1} | {:.1} | {} |",
            latencies.len(),
            latencies.len() as f64 / elapsed,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            failures.load(Ordering::Relaxed),
        );
    }
}
