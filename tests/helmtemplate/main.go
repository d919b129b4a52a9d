// Command helmtemplate renders a Helm chart's templates the way `helm template` does, for
// machines without a helm binary: Go's text/template with Sprig v3 and Helm's toYaml and
// required, values from values.yaml merged with a JSON object of overrides (numbers as
// float64, as Helm reads them), missing keys rendered empty. It knows only what the
// explaind chart uses; a function it lacks fails the parse, so it cannot pass silently.
//
//	helmtemplate CHART_DIR '{"startupSeconds": 5}'
//
// prints each template's output after "# Source: NAME", or the error and exits 1.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	sprig "github.com/Masterminds/sprig"
	"gopkg.in/yaml.v2"
)

func main() {
	if len(os.Args) != 3 {
		fail(fmt.Errorf("usage: helmtemplate CHART_DIR OVERRIDES_JSON"))
	}
	chart := os.Args[1]
	values := readYAML(filepath.Join(chart, "values.yaml"))
	var overrides map[string]interface{}
	if err := json.Unmarshal([]byte(os.Args[2]), &overrides); err != nil {
		fail(fmt.Errorf("overrides: %w", err))
	}
	merge(values, overrides)
	meta := readYAML(filepath.Join(chart, "Chart.yaml"))
	context := map[string]interface{}{
		"Values":  values,
		"Release": map[string]interface{}{"Name": "release", "Namespace": "default", "Service": "Helm"},
		"Chart":   map[string]interface{}{"Name": meta["name"], "Version": meta["version"], "AppVersion": meta["appVersion"]},
	}
	functions := sprig.TxtFuncMap()
	functions["toYaml"] = func(v interface{}) string {
		data, err := yaml.Marshal(v)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(data), "\n")
	}
	functions["required"] = func(message string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, fmt.Errorf(message)
		}
		return v, nil
	}
	names, err := filepath.Glob(filepath.Join(chart, "templates", "*.yaml"))
	if err != nil {
		fail(err)
	}
	sort.Strings(names)
	for _, name := range names {
		text, err := os.ReadFile(name)
		if err != nil {
			fail(err)
		}
		parsed, err := template.New(filepath.Base(name)).Funcs(functions).Option("missingkey=zero").Parse(string(text))
		if err != nil {
			fail(err)
		}
		var out strings.Builder
		if err := parsed.Execute(&out, context); err != nil {
			fail(err)
		}
		fmt.Printf("---\n# Source: %s\n%s\n", filepath.Base(name), strings.ReplaceAll(out.String(), "<no value>", ""))
	}
}

// readYAML reads a YAML mapping as JSON would hold it (string keys, float64 numbers).
func readYAML(path string) map[string]interface{} {
	text, err := os.ReadFile(path)
	if err != nil {
		fail(err)
	}
	var raw interface{}
	if err := yaml.Unmarshal(text, &raw); err != nil {
		fail(fmt.Errorf("%s: %w", path, err))
	}
	encoded, err := json.Marshal(stringKeys(raw))
	if err != nil {
		fail(err)
	}
	values := map[string]interface{}{}
	if err := json.Unmarshal(encoded, &values); err != nil {
		fail(err)
	}
	return values
}

func stringKeys(v interface{}) interface{} {
	switch node := v.(type) {
	case map[interface{}]interface{}:
		out := map[string]interface{}{}
		for key, value := range node {
			out[fmt.Sprint(key)] = stringKeys(value)
		}
		return out
	case []interface{}:
		for i, value := range node {
			node[i] = stringKeys(value)
		}
	}
	return v
}

// merge sets overrides into values as helm --set-json does: mappings present in both merge
// key by key, and a null deletes the key.
func merge(values, overrides map[string]interface{}) {
	for key, value := range overrides {
		inner, isMap := value.(map[string]interface{})
		existing, wasMap := values[key].(map[string]interface{})
		switch {
		case value == nil:
			delete(values, key)
		case isMap && wasMap:
			merge(existing, inner)
		default:
			values[key] = value
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "Error:", err)
	os.Exit(1)
}
