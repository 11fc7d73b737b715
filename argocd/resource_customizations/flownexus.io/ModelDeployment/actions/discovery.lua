-- Which ModelDeployment actions apply now; every action writes the spec (GitOps-friendly, see
-- docs/MODELDEPLOYMENT.md, "Manual control"), the operator acknowledges one-shot actions in status.actions.
local actions = {}
actions["promote"] = {["disabled"] = true}
actions["abort"] = {["disabled"] = true}
actions["retry"] = {["disabled"] = true}
actions["pause"] = {["disabled"] = true}
actions["resume"] = {["disabled"] = true}
local phase = nil
local canary = nil
if obj.status ~= nil then
  phase = obj.status.phase
  canary = obj.status.canary
end
if phase == "Canary" and canary ~= nil then
  actions["promote"]["disabled"] = false
  actions["abort"]["disabled"] = false
end
if phase == "RolledBack" then
  actions["retry"]["disabled"] = false
end
local paused = obj.spec ~= nil and obj.spec.rollout ~= nil and obj.spec.rollout.paused == true
if paused then
  actions["resume"]["disabled"] = false
else
  actions["pause"]["disabled"] = false
end
return actions
