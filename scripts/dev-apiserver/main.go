// weir-dev-apiserver: upstream k8s.io/apiextensions-apiserver (from Debian's
// golang-k8s-apiextensions-apiserver-dev) run standalone, for Weir's cluster
// suite on machines without a kube-apiserver. Authn/authz delegation is
// optional, everyone is allowed, admission is off, and /api + /apis
// discovery are served so kubectl works.
//
// The kinds the suite needs from outside the CRD world are served by
// custom resources: Leases and events.k8s.io Events as CRDs in their real
// groups (paths and JSON identical to kube-apiserver's), and core/v1 Nodes
// through a shim that maps /api/v1/nodes onto the CRD group core.weir.test
// and rewrites apiVersion in requests and responses (see crds.json).
package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	extensionsapiserver "k8s.io/apiextensions-apiserver/pkg/apiserver"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	"k8s.io/apiserver/pkg/endpoints/responsewriter"
	"k8s.io/apiserver/pkg/util/openapi"
	discoveryendpoint "k8s.io/apiserver/pkg/endpoints/discovery/aggregated"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/component-base/cli"
)

// The CRD group that stands for the core group's Nodes.
const shimGroup = "core.weir.test"

var (
	shimVersion = []byte(`"` + shimGroup + `/v1"`)
	coreVersion = []byte(`"v1"`)
)

// rewriter turns the shim group's apiVersion back into core v1 in every
// chunk written (watch events are written and flushed one at a time).
type rewriter struct{ w http.ResponseWriter }

func (r *rewriter) Unwrap() http.ResponseWriter { return r.w }
func (r *rewriter) Header() http.Header         { return r.w.Header() }
func (r *rewriter) WriteHeader(code int) {
	r.w.Header().Del("Content-Length")
	r.w.WriteHeader(code)
}
func (r *rewriter) Write(b []byte) (int, error) {
	_, err := r.w.Write(bytes.ReplaceAll(b, shimVersion, coreVersion))
	return len(b), err
}

// coreShim serves /api/v1/nodes from the shim CRD.
func coreShim(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/api/v1":
			w.Header().Set("Content-Type", "application/json")
			w.Write([]byte(`{"kind":"APIResourceList","groupVersion":"v1","resources":[{"name":"nodes","singularName":"node","namespaced":false,"kind":"Node","verbs":["create","delete","get","list","patch","update","watch"]}]}`))
			return
		case strings.HasPrefix(r.URL.Path, "/api/v1/nodes"):
			r.URL.Path = "/apis/" + shimGroup + "/v1" + strings.TrimPrefix(r.URL.Path, "/api/v1")
			r.URL.RawPath = ""
			r.RequestURI = r.URL.RequestURI()
			if r.Method == http.MethodPost || r.Method == http.MethodPut || r.Method == http.MethodPatch {
				body, err := io.ReadAll(r.Body)
				if err != nil {
					http.Error(w, err.Error(), http.StatusBadRequest)
					return
				}
				for _, v := range []string{`"apiVersion":"v1"`, `"apiVersion": "v1"`} {
					body = bytes.ReplaceAll(body, []byte(v), []byte(`"apiVersion":"`+shimGroup+`/v1"`))
				}
				r.Body = io.NopCloser(bytes.NewReader(body))
				r.ContentLength = int64(len(body))
				r.Header.Set("Content-Length", strconv.Itoa(len(body)))
			}
			w = responsewriter.WrapForHTTP1Or2(&rewriter{w: w})
		}
		next.ServeHTTP(w, r)
	})
}

// legacyGroups answers the unaggregated /apis (APIGroupList) from the
// aggregated discovery document, which knows the CRD groups (in
// kube-apiserver the aggregator lists them).
func legacyGroups(apis http.Handler, w http.ResponseWriter, r *http.Request) {
	rec := httptest.NewRecorder()
	req := r.Clone(r.Context())
	req.Header.Set("Accept", "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList")
	apis.ServeHTTP(rec, req)
	var agg struct {
		Items []struct {
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
			Versions []struct {
				Version string `json:"version"`
			} `json:"versions"`
		} `json:"items"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &agg); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	type gv struct {
		GroupVersion string `json:"groupVersion"`
		Version      string `json:"version"`
	}
	type group struct {
		Name      string `json:"name"`
		Versions  []gv   `json:"versions"`
		Preferred gv     `json:"preferredVersion"`
	}
	groups := []group{}
	for _, g := range agg.Items {
		if g.Metadata.Name == shimGroup || len(g.Versions) == 0 {
			continue
		}
		out := group{Name: g.Metadata.Name}
		for _, v := range g.Versions {
			out.Versions = append(out.Versions, gv{g.Metadata.Name + "/" + v.Version, v.Version})
		}
		out.Preferred = out.Versions[0]
		groups = append(groups, out)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

func main() {
	ctx := genericapiserver.SetupSignalContext()
	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)
	ro := o.RecommendedOptions
	ro.Authentication.RemoteKubeConfigFileOptional = true
	ro.Authentication.SkipInClusterLookup = true
	ro.Authorization.RemoteKubeConfigFileOptional = true
	ro.Authorization.AlwaysAllowPaths = []string{"/*"}
	ro.Authorization.AlwaysAllowGroups = []string{"system:masters", "system:authenticated", "system:unauthenticated"}
	ro.Admission = nil
	cmd := &cobra.Command{
		Use:   "weir-dev-apiserver",
		Short: "standalone apiextensions-apiserver (CRDs + custom resources)",
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return o.ServerRunOptions.ComponentGlobalsRegistry.Set()
		},
		RunE: func(c *cobra.Command, args []string) error {
			if err := o.Complete(); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			config, err := o.Config()
			if err != nil {
				return err
			}
			// also serve OpenAPI v2 (/openapi/v2), as kube-apiserver does; kubectl validation uses it
			config.GenericConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(
				openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions),
				openapinamer.NewDefinitionNamer(extensionsapiserver.Scheme))
			// No core API (services, namespaces, ...) behind this server: give the generic server an informer
			// factory over an empty fake clientset so /readyz's informer-sync check passes.
			config.GenericConfig.SharedInformerFactory = informers.NewSharedInformerFactory(fake.NewSimpleClientset(), 0)
			var apis http.Handler
			config.GenericConfig.BuildHandlerChainFunc = func(h http.Handler, gc *genericapiserver.Config) http.Handler {
				inner := genericapiserver.DefaultBuildHandlerChain(h, gc)
				outer := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					switch r.URL.Path {
					case "/api", "/api/":
						// the core group holds only the shimmed Nodes
						w.Header().Set("Content-Type", "application/json")
						w.Write([]byte(`{"kind":"APIVersions","versions":["v1"],"serverAddressByClientCIDRs":[{"clientCIDR":"0.0.0.0/0","serverAddress":"127.0.0.1"}]}`))
						return
					case "/apis", "/apis/":
						if apis != nil && !strings.Contains(r.Header.Get("Accept"), "apidiscovery.k8s.io") {
							legacyGroups(apis, w, r)
							return
						}
						if apis != nil {
							apis.ServeHTTP(w, r)
							return
						}
					}
					inner.ServeHTTP(w, r)
				})
				return coreShim(outer)
			}
			srv, err := config.Complete().New(genericapiserver.NewEmptyDelegate())
			if err != nil {
				return err
			}
			g := srv.GenericAPIServer
			apis = discoveryendpoint.WrapAggregatedDiscoveryToHandler(g.DiscoveryGroupManager, g.AggregatedDiscoveryGroupManager, g.AggregatedDiscoveryGroupManager)
			return g.PrepareRun().RunWithContext(c.Context())
		},
	}
	cmd.SetContext(ctx)
	o.AddFlags(cmd.Flags())
	os.Exit(cli.Run(cmd))
}
