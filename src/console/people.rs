//! People and groups as the providers reported them at sign-in, group sync or SCIM: each
//! person's memberships with their source and when last seen, and their devices.

use askama::Template;
use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use super::grants::Need;
use super::pages::{Chrome, bounded, device_href, when};
use super::{SignedIn, internal, problem, render};
use crate::admin::scope::Scope;
use crate::http::AppState;

const PEOPLE_PAGE: u32 = 200;

#[derive(Debug, Default, Deserialize)]
pub struct PeopleQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    group: String,
}

pub struct PersonLine {
    pub href: String,
    pub name: String,
    pub login: String,
    pub email: String,
    pub provider: String,
    pub devices: i64,
    pub last_sign_in: String,
}

#[derive(Template)]
#[template(path = "console/people.html")]
pub struct PeoplePage {
    pub chrome: Chrome,
    pub q: String,
    pub group: String,
    pub people: Vec<PersonLine>,
    pub full: bool,
}

fn person_href(id: &str) -> String {
    format!("/admin/people/{}", super::pages::segment(id))
}

pub async fn people(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    query: Result<Query<PeopleQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(refused) = admin
        .require(
            &state,
            Need::Scope(Scope::UsersRead),
            "console.people",
            None,
        )
        .await
    {
        return refused;
    }
    let Query(query) = query.unwrap_or_default();
    let rows = match state
        .store
        .console_people(
            bounded(&query.q).as_deref(),
            bounded(&query.group).as_deref(),
            PEOPLE_PAGE,
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) => return internal(&e),
    };
    let full = rows.len() == PEOPLE_PAGE as usize;
    let people = rows
        .into_iter()
        .map(|p| PersonLine {
            href: person_href(&p.id),
            name: p
                .display_name
                .clone()
                .or(p.login.clone())
                .unwrap_or_else(|| p.subject.clone()),
            login: p.login.unwrap_or_default(),
            email: p.email.unwrap_or_default(),
            provider: p.provider,
            devices: p.devices,
            last_sign_in: when(&p.last_sign_in_at),
        })
        .collect();
    render(
        StatusCode::OK,
        &PeoplePage {
            chrome: Chrome::of(&admin, "people"),
            q: query.q,
            group: query.group,
            people,
            full,
        },
    )
}

pub struct MembershipLine {
    pub name: String,
    pub external_id: String,
    pub source: String,
    pub first_seen: String,
    pub last_seen: String,
    pub href: String,
}

pub struct OwnedLine {
    pub href: String,
    pub name: String,
    pub model: String,
    pub os: String,
    pub since: String,
}

#[derive(Template)]
#[template(path = "console/person.html")]
pub struct PersonPage {
    pub chrome: Chrome,
    pub name: String,
    pub facts: Vec<(&'static str, String)>,
    pub groups: Vec<MembershipLine>,
    pub devices: Vec<OwnedLine>,
}

pub async fn person(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    Path(id): Path<String>,
) -> Response {
    if let Err(refused) = admin
        .require(
            &state,
            Need::Scope(Scope::UsersRead),
            "console.person",
            Some(&id),
        )
        .await
    {
        return refused;
    }
    let user = match state.store.user(&id).await {
        Ok(Some(user)) => user,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                "No such person",
                "Nobody with that id has signed in or been provisioned.",
                true,
            );
        }
        Err(e) => return internal(&e),
    };
    let (groups, devices) = match (
        state.store.memberships(&id).await,
        state.store.devices_of(&id).await,
    ) {
        (Ok(groups), Ok(devices)) => (groups, devices),
        (Err(e), _) | (_, Err(e)) => return internal(&e),
    };
    let text = |v: &Option<String>| v.clone().unwrap_or_else(|| "—".to_owned());
    render(
        StatusCode::OK,
        &PersonPage {
            chrome: Chrome::of(&admin, "people"),
            name: user
                .display_name
                .clone()
                .or(user.login.clone())
                .unwrap_or_else(|| user.subject.clone()),
            facts: vec![
                ("Login", text(&user.login)),
                ("E-mail", text(&user.email)),
                ("Provider", user.provider.clone()),
                ("Subject", user.subject.clone()),
                ("First seen", when(&user.created_at)),
                ("Last sign-in", when(&user.last_sign_in_at)),
            ],
            groups: groups
                .into_iter()
                .map(|g| MembershipLine {
                    href: format!(
                        "/admin/people?group={}",
                        super::pages::segment(&g.external_id)
                    ),
                    name: g.name,
                    external_id: g.external_id,
                    source: g.source,
                    first_seen: when(&g.first_seen_at),
                    last_seen: when(&g.last_seen_at),
                })
                .collect(),
            devices: devices
                .into_iter()
                .map(|d| OwnedLine {
                    href: device_href(&d.udid),
                    name: d.device_name.unwrap_or_else(|| d.udid.clone()),
                    model: d.model_name.unwrap_or_default(),
                    os: d.os_version.unwrap_or_default(),
                    since: d.owner_bound_at.as_ref().map(when).unwrap_or_default(),
                })
                .collect(),
        },
    )
}

pub struct GroupLine {
    pub name: String,
    pub external_id: String,
    pub provider: String,
    pub members: i64,
    pub updated: String,
    pub people_href: String,
    pub devices_href: String,
}

#[derive(Template)]
#[template(path = "console/groups.html")]
pub struct GroupsPage {
    pub chrome: Chrome,
    pub groups: Vec<GroupLine>,
}

pub async fn groups(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
) -> Response {
    if let Err(refused) = admin
        .require(
            &state,
            Need::Scope(Scope::UsersRead),
            "console.groups",
            None,
        )
        .await
    {
        return refused;
    }
    let groups = match state.store.list_groups().await {
        Ok(groups) => groups,
        Err(e) => return internal(&e),
    };
    render(
        StatusCode::OK,
        &GroupsPage {
            chrome: Chrome::of(&admin, "groups"),
            groups: groups
                .into_iter()
                .map(|g| {
                    let key = super::pages::segment(&g.external_id);
                    GroupLine {
                        people_href: format!("/admin/people?group={key}"),
                        devices_href: format!("/admin/devices?group={key}"),
                        name: g.name,
                        external_id: g.external_id,
                        provider: g.provider,
                        members: g.members,
                        updated: when(&g.updated_at),
                    }
                })
                .collect(),
        },
    )
}
