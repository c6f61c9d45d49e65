"""Drives trustbroker's /scim/v2 with scim2-client (an independent SCIM client library), the way
an IdP provisions: discover, get by filter then create, a group with the user, deactivate by
PATCH, read back, delete. Prints one JSON line with the IDs for the Rust test to check.

    python driver.py BASE_URL TOKEN CA_CERT
"""

import json
import ssl
import sys

import httpx2
from scim2_client.engines.httpx2 import SyncSCIMClient
from scim2_models import PatchOp, PatchOperation, SearchRequest

base, token, cert = sys.argv[1:4]
context = ssl.create_default_context(cafile=cert)
http = httpx2.Client(
    base_url=base.rstrip("/") + "/scim/v2/",
    headers={"Authorization": f"Bearer {token}"},
    verify=context,
    timeout=30,
)
scim = SyncSCIMClient(http)
scim.discover()
UserModel = scim.get_resource_model("User")
GroupModel = scim.get_resource_model("Group")

user_name = "py.user@example.org"
# Okta's sequence: look the person up by userName, create them when absent.
found = scim.query(UserModel, query_parameters=SearchRequest(filter=f'userName eq "{user_name}"'))
assert found.total_results == 0, found
created = scim.create(
    UserModel.model_validate(
        {
            "userName": user_name,
            "externalId": "py-subject-1",
            "name": {"givenName": "Py", "familyName": "User"},
            "emails": [{"value": user_name, "type": "work", "primary": True}],
            "active": True,
        }
    )
)
assert created.id and created.active, created
found = scim.query(UserModel, query_parameters=SearchRequest(filter=f'userName eq "{user_name}"'))
assert found.total_results == 1 and found.resources[0].id == created.id, found

group = scim.create(
    GroupModel.model_validate(
        {
            "displayName": "py-group",
            "externalId": "py-group-ext",
            "members": [{"value": created.id}],
        }
    )
)
assert group.id, group

patch = PatchOp[UserModel](
    operations=[PatchOperation[UserModel](op="replace", path="active", value=False)]
)
scim.modify(UserModel, created.id, patch)
again = scim.query(UserModel, created.id)
assert again.active is False, again
assert again.meta.version and again.meta.version != created.meta.version, again.meta

print(json.dumps({"user_id": created.id, "group_id": group.id}))
