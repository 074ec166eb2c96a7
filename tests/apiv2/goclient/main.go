// Command apiv2goclient drives pyheadscale's /api/v2 with Tailscale's official Go client
// (tailscale.com/client/tailscale/v2), once with an admin API key and once per OAuth client,
// the way Tailscale's tools (the Terraform provider, tscli) call it. It reads a JSON plan on
// stdin, prints one "PASS <check>" or "FAIL <check>: <why>" line per check and exits 1 if any
// check failed. The Python test (tests/integration/test_apiv2_clients.py) seeds the server,
// runs this and cross-checks the server's state afterwards.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	ts "tailscale.com/client/tailscale/v2"
)

type oauthCreds struct {
	ID     string `json:"id"`
	Secret string `json:"secret"`
}

type plan struct {
	Base        string     `json:"base"`
	APIKey      string     `json:"apiKey"`
	OwnerID     string     `json:"ownerId"`
	Device      string     `json:"device"`      // user-owned, advertises routes
	Doomed      string     `json:"doomed"`      // deleted by the API-key run
	OAuthDevice string     `json:"oauthDevice"` // tagged tag:ci, driven with OAuth
	OAuthAll    oauthCreds `json:"oauthAll"`    // scopes all, tags tag:ci
	OAuthRead   oauthCreds `json:"oauthRead"`   // scopes all:read
	OAuthOp     oauthCreds `json:"oauthOperator"`
	Policy      string     `json:"policy"` // HuJSON the run sets and restores
	DefaultACL  string     `json:"defaultAcl"`
}

var failed int

func check(name string, err error) {
	if err != nil {
		failed++
		fmt.Printf("FAIL %s: %v\n", name, err)
		return
	}
	fmt.Printf("PASS %s\n", name)
}

func want(cond bool, format string, args ...any) error {
	if cond {
		return nil
	}
	return fmt.Errorf(format, args...)
}

// status reports the HTTP status of an API error (0 if err is not one).
func status(err error) int {
	var apiErr ts.APIError
	if errors.As(err, &apiErr) {
		return apiErr.Status
	}
	return 0
}

func wantStatus(err error, code int) error {
	if err == nil {
		return fmt.Errorf("want HTTP %d, got success", code)
	}
	return want(status(err) == code, "want HTTP %d, got %v", code, err)
}

func apiKeyClient(p plan) *ts.Client {
	base, _ := url.Parse(p.Base)
	return &ts.Client{BaseURL: base, APIKey: p.APIKey, Tailnet: "-",
		HTTP: &http.Client{Timeout: 30 * time.Second}}
}

func oauthClient(p plan, c oauthCreds, scopes ...string) *ts.Client {
	base, _ := url.Parse(p.Base)
	return &ts.Client{BaseURL: base, Tailnet: "-", HTTP: &http.Client{Timeout: 30 * time.Second},
		Auth: &ts.OAuth{ClientID: c.ID, ClientSecret: c.Secret, Scopes: scopes}}
}

func main() {
	var p plan
	if err := json.NewDecoder(os.Stdin).Decode(&p); err != nil {
		fmt.Println("FAIL plan:", err)
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	admin := apiKeyClient(p)
	users(ctx, "apikey", admin, p)
	devices(ctx, "apikey", admin, p, p.Device)
	keys(ctx, "apikey", admin, p)
	policy(ctx, "apikey", admin, p)
	settings(ctx, "apikey", admin)
	check("apikey/devices.Delete", func() error {
		if err := admin.Devices().Delete(ctx, p.Doomed); err != nil {
			return err
		}
		_, err := admin.Devices().Get(ctx, p.Doomed)
		return want(ts.IsNotFound(err), "deleted device still readable: %v", err)
	}())
	basicAuthAndBadKey(ctx, p)

	all := oauthClient(p, p.OAuthAll)
	users(ctx, "oauth", all, p)
	devices(ctx, "oauth", all, p, p.OAuthDevice)
	policy(ctx, "oauth", all, p)
	settings(ctx, "oauth", all)
	oauthKeys(ctx, all, p)
	readOnly(ctx, oauthClient(p, p.OAuthRead), p)
	narrowed(ctx, p)
	operator(ctx, oauthClient(p, p.OAuthOp), p)

	fmt.Printf("%d failed\n", failed)
	if failed > 0 {
		os.Exit(1)
	}
}

func users(ctx context.Context, who string, c *ts.Client, p plan) {
	ur := c.Users()
	check(who+"/users.List", func() error {
		all, err := ur.List(ctx, nil, nil)
		if err != nil {
			return err
		}
		i := slices.IndexFunc(all, func(u ts.User) bool { return u.ID == p.OwnerID })
		return want(i >= 0 && all[i].Type == ts.UserTypeMember && all[i].Status == ts.UserStatusActive,
			"owner %s not listed as an active member: %+v", p.OwnerID, all)
	}())
	check(who+"/users.List(type=shared)", func() error {
		shared, err := ur.List(ctx, ptr(ts.UserTypeShared), nil)
		if err != nil {
			return err
		}
		return want(len(shared) == 0, "shared users listed: %+v", shared)
	}())
	check(who+"/users.List(role=admin)", func() error {
		admins, err := ur.List(ctx, nil, ptr(ts.UserRoleAdmin))
		if err != nil {
			return err
		}
		return want(len(admins) == 0, "admin-role users listed: %+v", admins)
	}())
	check(who+"/users.Get", func() error {
		u, err := ur.Get(ctx, p.OwnerID)
		if err != nil {
			return err
		}
		// The API-key run goes first, while the owner still has two untagged devices.
		return want(u.ID == p.OwnerID && u.LoginName != "" && u.TailnetID == "1" &&
			!u.Created.IsZero() && (who != "apikey" || u.DeviceCount == 2), "unexpected user %+v", u)
	}())
	check(who+"/users.Get(unknown)", func() error {
		_, err := ur.Get(ctx, "999999")
		return want(ts.IsNotFound(err), "want 404, got %v", err)
	}())
}

func devices(ctx context.Context, who string, c *ts.Client, p plan, id string) {
	dr := c.Devices()
	check(who+"/devices.List", func() error {
		list, err := dr.List(ctx)
		if err != nil {
			return err
		}
		i := slices.IndexFunc(list, func(d ts.Device) bool { return d.NodeID == id })
		if i < 0 {
			return fmt.Errorf("device %s not listed", id)
		}
		return want(len(list[i].EnabledRoutes) == 0 && len(list[i].Addresses) == 2,
			"plain list must omit routes and carry both addresses: %+v", list[i])
	}())
	check(who+"/devices.ListWithAllFields", func() error {
		list, err := dr.ListWithAllFields(ctx)
		if err != nil {
			return err
		}
		i := slices.IndexFunc(list, func(d ts.Device) bool { return d.NodeID == id })
		return want(i >= 0 && slices.Contains(list[i].AdvertisedRoutes, "10.1.0.0/24"),
			"advertised routes missing with fields=all: %+v", list)
	}())
	check(who+"/devices.Get", func() error {
		d, err := dr.Get(ctx, id)
		if err != nil {
			return err
		}
		return want(d.ID == id && d.Authorized && strings.HasPrefix(d.NodeKey, "nodekey:") &&
			strings.HasPrefix(d.MachineKey, "mkey:") && d.OS == "linux" && !d.Created.IsZero(),
			"unexpected device %+v", d)
	}())
	check(who+"/devices.Get(unknown)", func() error {
		_, err := dr.Get(ctx, "not-a-device")
		return want(ts.IsNotFound(err), "want 404, got %v", err)
	}())
	newName := who + "-renamed"
	check(who+"/devices.SetName", func() error {
		if err := dr.SetName(ctx, id, newName); err != nil {
			return err
		}
		d, err := dr.Get(ctx, id)
		if err != nil {
			return err
		}
		return want(d.Name == newName, "name is %q after SetName(%q)", d.Name, newName)
	}())
	check(who+"/devices.SetName(invalid)", wantStatus(dr.SetName(ctx, id, "Bad_Name!"), 400))
	check(who+"/devices.SetTags", func() error {
		if err := dr.SetTags(ctx, id, []string{"tag:ci"}); err != nil {
			return err
		}
		d, err := dr.Get(ctx, id)
		if err != nil {
			return err
		}
		return want(slices.Equal(d.Tags, []string{"tag:ci"}) && d.User == "tagged-devices",
			"tags %v user %q after SetTags", d.Tags, d.User)
	}())
	// Tags cannot be removed (they are an identity): an empty set is accepted and changes
	// nothing, so a Terraform destroy of device tags succeeds.
	check(who+"/devices.SetTags(nil)", func() error {
		if err := dr.SetTags(ctx, id, nil); err != nil {
			return err
		}
		d, err := dr.Get(ctx, id)
		if err != nil {
			return err
		}
		return want(slices.Equal(d.Tags, []string{"tag:ci"}), "tags %v after SetTags(nil)", d.Tags)
	}())
	// A token is refused a tag it does not hold or own (403) before the tag is looked up.
	undefined := map[bool]int{true: 403, false: 400}[who == "oauth"]
	check(who+"/devices.SetTags(undefined)", wantStatus(dr.SetTags(ctx, id, []string{"tag:nope"}), undefined))
	check(who+"/devices.SetKey", func() error {
		if err := dr.SetKey(ctx, id, ts.DeviceKey{KeyExpiryDisabled: true}); err != nil {
			return err
		}
		d, err := dr.Get(ctx, id)
		if err != nil {
			return err
		}
		return want(d.KeyExpiryDisabled && d.Expires.IsZero(), "expiry not disabled: %+v", d)
	}())
	check(who+"/devices.SetAuthorized(true)", dr.SetAuthorized(ctx, id, true))
	check(who+"/devices.SetAuthorized(false)", wantStatus(dr.SetAuthorized(ctx, id, false), 400))
	check(who+"/devices.SetSubnetRoutes", func() error {
		if err := dr.SetSubnetRoutes(ctx, id, []string{"10.1.0.0/24", "0.0.0.0/0"}); err != nil {
			return err
		}
		r, err := dr.SubnetRoutes(ctx, id)
		if err != nil {
			return err
		}
		// An exit route enables both families; the set comes back in netip order.
		return want(slices.Equal(r.Enabled, []string{"0.0.0.0/0", "10.1.0.0/24", "::/0"}) &&
			slices.Contains(r.Advertised, "10.1.0.0/24"), "routes after set: %+v", r)
	}())
	check(who+"/devices.SetSubnetRoutes(clear)", func() error {
		if err := dr.SetSubnetRoutes(ctx, id, []string{}); err != nil {
			return err
		}
		r, err := dr.SubnetRoutes(ctx, id)
		if err != nil {
			return err
		}
		return want(len(r.Enabled) == 0, "routes not cleared: %+v", r)
	}())
	check(who+"/devices.SetSubnetRoutes(invalid)",
		wantStatus(dr.SetSubnetRoutes(ctx, id, []string{"not-a-prefix"}), 400))
}

func keys(ctx context.Context, who string, c *ts.Client, p plan) {
	kr := c.Keys()
	var req ts.CreateKeyRequest
	req.Description = "go-client"
	req.ExpirySeconds = 3600
	req.Capabilities.Devices.Create.Reusable = true
	created, err := kr.CreateAuthKey(ctx, req)
	check(who+"/keys.CreateAuthKey(user-owned)", func() error {
		if err != nil {
			return err
		}
		return want(created.Key != "" && created.UserID == p.OwnerID && created.KeyType == "auth" &&
			created.Description == "go-client", "unexpected key %+v", created)
	}())
	if err != nil {
		return
	}
	check(who+"/keys.Get", func() error {
		k, err := kr.Get(ctx, created.ID)
		if err != nil {
			return err
		}
		lifetime := k.Expires.Sub(k.Created)
		return want(k.Key == "" && !k.Invalid && lifetime > 3590*time.Second &&
			lifetime < 3610*time.Second && k.Capabilities.Devices.Create.Reusable,
			"unexpected key on read %+v", k)
	}())
	check(who+"/keys.List", func() error {
		list, err := kr.List(ctx, true)
		if err != nil {
			return err
		}
		return want(slices.ContainsFunc(list, func(k ts.Key) bool { return k.ID == created.ID }),
			"created key not listed")
	}())
	check(who+"/keys.Delete", func() error {
		if err := kr.Delete(ctx, created.ID); err != nil {
			return err
		}
		k, err := kr.Get(ctx, created.ID)
		if err != nil {
			return err
		}
		return want(k.Invalid && !k.Revoked.IsZero(), "deleted key not revoked: %+v", k)
	}())
	check(who+"/keys.Delete(again)", func() error {
		return want(ts.IsNotFound(kr.Delete(ctx, created.ID)), "second delete is not a 404")
	}())
	check(who+"/keys.CreateAuthKey(tagged,ephemeral)", func() error {
		var r ts.CreateKeyRequest
		r.Capabilities.Devices.Create.Ephemeral = true
		r.Capabilities.Devices.Create.Tags = []string{"tag:ci"}
		k, err := kr.CreateAuthKey(ctx, r)
		if err != nil {
			return err
		}
		lifetime := k.Expires.Sub(k.Created)
		return want(slices.Equal(k.Tags, []string{"tag:ci"}) && k.UserID == "" &&
			k.Capabilities.Devices.Create.Ephemeral && lifetime > 89*24*time.Hour,
			"unexpected tagged key %+v", k)
	}())
	check(who+"/keys.Get(unknown)", func() error {
		_, err := kr.Get(ctx, "424242")
		return want(ts.IsNotFound(err), "want 404, got %v", err)
	}())
	client, err := kr.CreateOAuthClient(ctx, ts.CreateOAuthClientRequest{
		Scopes: []string{"devices:core", "auth_keys"}, Tags: []string{"tag:ci"},
		Description: "made by the go client"})
	check(who+"/keys.CreateOAuthClient", func() error {
		if err != nil {
			return err
		}
		return want(client.KeyType == "client" && strings.HasPrefix(client.Key, "hskey-client-"+client.ID+"-"),
			"unexpected client %+v", client)
	}())
	if err != nil {
		return
	}
	check(who+"/keys.Get(client)", func() error {
		k, err := kr.Get(ctx, client.ID)
		if err != nil {
			return err
		}
		return want(k.Key == "" && k.KeyType == "client" &&
			slices.Equal(k.Scopes, []string{"auth_keys", "devices:core"}), "client on read %+v", k)
	}())
	check(who+"/keys.SetOAuthClient", func() error {
		k, err := kr.SetOAuthClient(ctx, client.ID, ts.SetOAuthClientRequest{
			Scopes: []string{"devices:core:read"}, Tags: []string{"tag:ci"}, Description: "narrowed"})
		if err != nil {
			return err
		}
		return want(slices.Equal(k.Scopes, []string{"devices:core:read"}) && k.Description == "narrowed",
			"client after set %+v", k)
	}())
	check(who+"/keys.CreateOAuthClient(no tags for auth_keys)", wantStatus(func() error {
		_, err := kr.CreateOAuthClient(ctx, ts.CreateOAuthClientRequest{Scopes: []string{"auth_keys"}})
		return err
	}(), 400))
	check(who+"/keys.Delete(client)", func() error {
		if err := kr.Delete(ctx, client.ID); err != nil {
			return err
		}
		_, err := kr.Get(ctx, client.ID)
		return want(ts.IsNotFound(err), "deleted client still readable: %v", err)
	}())
}

func policy(ctx context.Context, who string, c *ts.Client, p plan) {
	pf := c.PolicyFile()
	raw, err := pf.Raw(ctx)
	check(who+"/policy.Raw", func() error {
		if err != nil {
			return err
		}
		return want(raw.ETag != "" && strings.Contains(raw.HuJSON, "tagOwners"), "raw %+v", raw)
	}())
	if err != nil {
		return
	}
	check(who+"/policy.Get", func() error {
		acl, err := pf.Get(ctx)
		if err != nil {
			return err
		}
		return want(acl.ETag == raw.ETag && len(acl.TagOwners["tag:ci"]) == 1, "acl %+v", acl)
	}())
	check(who+"/policy.Validate", pf.Validate(ctx, p.Policy))
	check(who+"/policy.Validate(invalid)", func() error {
		err := pf.Validate(ctx, `{"acls": [{"action": "bogus", "src": ["*"], "dst": ["*:*"]}]}`)
		return want(err != nil, "invalid policy validated")
	}())
	hujson := p.Policy + "\n// set by " + who + "\n"
	check(who+"/policy.Set(If-Match)", pf.Set(ctx, hujson, raw.ETag))
	check(who+"/policy.Set(stale If-Match)", wantStatus(pf.Set(ctx, p.Policy, raw.ETag), 412))
	check(who+"/policy.Set(ts-default on a custom policy)", wantStatus(pf.Set(ctx, p.Policy, "ts-default"), 412))
	check(who+"/policy.Raw(after set)", func() error {
		r, err := pf.Raw(ctx)
		if err != nil {
			return err
		}
		return want(r.HuJSON == hujson && r.ETag != raw.ETag, "stored policy %q", r.HuJSON)
	}())
	check(who+"/policy.SetAndGet", func() error {
		acl, err := pf.Get(ctx)
		if err != nil {
			return err
		}
		acl.Hosts = map[string]string{"router": "100.64.0.200"}
		out, err := pf.SetAndGet(ctx, *acl, acl.ETag)
		if err != nil {
			return err
		}
		return want(out.Hosts["router"] == "100.64.0.200" && out.ETag != acl.ETag, "acl %+v", out)
	}())
	// What the Terraform provider does on destroy: an empty policy resets to the default,
	// and "ts-default" then matches again.
	check(who+"/policy.Set(reset)", func() error {
		if err := pf.Set(ctx, "", ""); err != nil {
			return err
		}
		r, err := pf.Raw(ctx)
		if err != nil {
			return err
		}
		if r.HuJSON != p.DefaultACL {
			return fmt.Errorf("reset policy is %q", r.HuJSON)
		}
		return pf.Set(ctx, p.Policy, "ts-default")
	}())
	check(who+"/policy.Set(invalid)", wantStatus(pf.Set(ctx, "{ not json", ""), 400))
}

func settings(ctx context.Context, who string, c *ts.Client) {
	check(who+"/settings.Get", func() error {
		s, err := c.TailnetSettings().Get(ctx)
		if err != nil {
			return err
		}
		return want(!s.ACLsExternallyManagedOn && s.UsersRoleAllowedToJoinExternalTailnets == "none",
			"settings %+v", s)
	}())
	check(who+"/settings.Update", wantStatus(c.TailnetSettings().Update(ctx, ts.UpdateTailnetSettingsRequest{
		DevicesApprovalOn: ptr(true)}), 501))
}

func basicAuthAndBadKey(ctx context.Context, p plan) {
	// The SDK sends the API key as the Basic user name; a bad key is a typed 401.
	bad := apiKeyClient(p)
	bad.APIKey = "hskey-api-000000000000-" + strings.Repeat("0", 64)
	_, err := bad.Devices().List(ctx)
	check("apikey/unauthorized", wantStatus(err, 401))
	tn := apiKeyClient(p)
	tn.Tailnet = "example.com"
	_, err = tn.Devices().List(ctx)
	check("apikey/unknown tailnet", want(ts.IsNotFound(err), "want 404, got %v", err))
}

func oauthKeys(ctx context.Context, c *ts.Client, p plan) {
	kr := c.Keys()
	check("oauth/keys.CreateAuthKey(held tag)", func() error {
		var r ts.CreateKeyRequest
		r.Capabilities.Devices.Create.Tags = []string{"tag:ci"}
		k, err := kr.CreateAuthKey(ctx, r)
		if err != nil {
			return err
		}
		return want(slices.Equal(k.Tags, []string{"tag:ci"}), "key %+v", k)
	}())
	check("oauth/keys.CreateAuthKey(untagged)", wantStatus(func() error {
		_, err := kr.CreateAuthKey(ctx, ts.CreateKeyRequest{})
		return err
	}(), 403))
	check("oauth/keys.CreateAuthKey(tag not held)", wantStatus(func() error {
		var r ts.CreateKeyRequest
		r.Capabilities.Devices.Create.Tags = []string{"tag:prod"}
		_, err := kr.CreateAuthKey(ctx, r)
		return err
	}(), 403))
	check("oauth/keys.List", func() error {
		list, err := kr.List(ctx, true)
		if err != nil {
			return err
		}
		return want(slices.ContainsFunc(list, func(k ts.Key) bool { return k.ID == p.OAuthAll.ID }),
			"an all-scope token must see the OAuth clients")
	}())
}

func readOnly(ctx context.Context, c *ts.Client, p plan) {
	check("oauth-read/devices.List", func() error { _, err := c.Devices().List(ctx); return err }())
	check("oauth-read/policy.Raw", func() error { _, err := c.PolicyFile().Raw(ctx); return err }())
	check("oauth-read/devices.SetName", wantStatus(c.Devices().SetName(ctx, p.Device, "x"), 403))
	check("oauth-read/devices.SetSubnetRoutes", wantStatus(c.Devices().SetSubnetRoutes(ctx, p.Device, nil), 403))
	check("oauth-read/policy.Set", wantStatus(c.PolicyFile().Set(ctx, p.Policy, ""), 403))
	check("oauth-read/keys.CreateAuthKey", wantStatus(func() error {
		var r ts.CreateKeyRequest
		r.Capabilities.Devices.Create.Tags = []string{"tag:ci"}
		_, err := c.Keys().CreateAuthKey(ctx, r)
		return err
	}(), 403))
}

// narrowed asks the token endpoint for less than the client holds, through the SDK's own
// OAuth config (x/oauth2 sends the scope parameter).
func narrowed(ctx context.Context, p plan) {
	c := oauthClient(p, p.OAuthAll, "users:read")
	check("oauth-narrowed/users.List", func() error { _, err := c.Users().List(ctx, nil, nil); return err }())
	_, err := c.Devices().List(ctx)
	check("oauth-narrowed/devices.List", wantStatus(err, 403))
	over := oauthClient(p, p.OAuthRead, "devices:core")
	_, err = over.Devices().List(ctx)
	check("oauth-widened/token refused", want(err != nil && strings.Contains(err.Error(), "invalid_scope"),
		"token for a scope the client lacks: %v", err))
}

// operator is the Kubernetes operator's pattern: a client tagged tag:k8s-operator mints keys
// for tag:k8s, which policy lets tag:k8s-operator own, and nothing else.
func operator(ctx context.Context, c *ts.Client, p plan) {
	kr := c.Keys()
	check("oauth-operator/keys.CreateAuthKey(owned tag)", func() error {
		var r ts.CreateKeyRequest
		r.Capabilities.Devices.Create.Tags = []string{"tag:k8s"}
		r.Capabilities.Devices.Create.Ephemeral = true
		k, err := kr.CreateAuthKey(ctx, r)
		if err != nil {
			return err
		}
		return want(slices.Equal(k.Tags, []string{"tag:k8s"}), "key %+v", k)
	}())
	check("oauth-operator/keys.CreateAuthKey(unowned tag)", wantStatus(func() error {
		var r ts.CreateKeyRequest
		r.Capabilities.Devices.Create.Tags = []string{"tag:ci"}
		_, err := kr.CreateAuthKey(ctx, r)
		return err
	}(), 403))
	check("oauth-operator/devices.SetTags(unowned)", wantStatus(c.Devices().SetTags(ctx, p.OAuthDevice, []string{"tag:prod"}), 403))
}

func ptr[T any](v T) *T { return &v }
